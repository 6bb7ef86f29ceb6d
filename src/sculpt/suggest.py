"""`sculpt suggest`: before erasing a concept, what it maps onto and what its erasure may hurt.

The erasure edits the cross-attention projections, which act on the text encoder's token states of
a prompt. Prompts whose states lie close to the concept's are moved with it: those are the
*neighbours at risk*. For each word of a vocabulary (the benchmark's classes, or the user's list)
this ranks

    sim(w) = cos( E("a photo of a <concept>"), E("a photo of a <w>") ),   E = the token states, flattened

the same states the UNet reads, so the ranking is the model's own, not a general word similarity.
It also proposes a superclass (the taxonomy's for a known class, else the superclass of the most
similar known class) and the known synonyms, checks the anchor by measurement (`check_anchor`: the
superclass pictures drawn with and without the concept as negative prompt, judged by the world's
classifier; the rule of sculpt.data.anchors decides) and writes a whole spec the user can edit
(`Suggestion.spec_yaml(model)`), with the neighbours to keep that the paper's method would pick.
What it proposes is a starting point for the spec, not a decision: the operator names the concept
and chooses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from typing import TYPE_CHECKING

from sculpt.config import Concept, DataConfig, fill_template
from sculpt.data.neighbours import similarities

if TYPE_CHECKING:
    from sculpt.data.wordnet import WordNet


@dataclass
class Suggestion:
    concept: str
    superclass: str | None
    superclass_reason: str
    synonyms: list[str]
    neighbours: list[tuple[str, float]]  # (word, similarity), most similar first
    members: list[str] = field(default_factory=list)  # a family: the classes it covers
    template: str = "a photo of a {}"
    notes: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)  # the neighbours the paper's method keeps (sculpt.data.neighbours)
    anchor: dict | None = None  # check_anchor's measurements and choice, when measured

    def concept_entry(self) -> dict:
        entry: dict = {"name": self.concept, "superclass": self.superclass or "<choose one>"}
        if self.members:
            entry["members"] = list(self.members)
        if self.synonyms:
            entry["synonyms"] = list(self.synonyms)
        if self.keep:
            entry["neighbours"] = list(self.keep)
        return entry  # no negative_prompt: the anchor rule decides it again when the data is made

    def spec_yaml(self, model: str = "emoji") -> str:
        """A whole spec (model, method, this concept) that `sculpt erase` accepts as it is."""
        import yaml

        head = [f"# written by `sculpt suggest {self.concept}`: check the superclass, the synonyms and the",
                "# neighbours to keep (nearest in the model's text space), then run `sculpt erase` on it."]
        if self.anchor is not None:
            head.append(f"# anchor check ({self.anchor.get('n', '-')} pictures): {self.anchor['how']}; the run's "
                        "data applies the same rule")
        body = {"model": model, "method": {"name": "sculpting"}, "concepts": [self.concept_entry()]}
        return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def suggest(concept: str, pipe, vocabulary: list[str] | None = None, taxonomy=None, top: int = 8,
            template: str = "a photo of a {}", wordnet: "WordNet | None | bool" = True) -> Suggestion:
    """Propose a superclass, synonyms and the neighbours at risk for `concept`.

    vocabulary: the words to rank (default: the taxonomy's class names). taxonomy: the emoji world's
    (sculpt.emoji.taxonomy.load_taxonomy()) or None for a real model, whose superclass is proposed
    from WordNet's hypernyms of the concept (`wordnet`: a WordNet, True to look for the installed
    one, False/None for none), ranked by similarity in the model's text space; with no WordNet and
    no known word near it, the superclass is left to the operator."""
    if not concept.strip():
        raise ValueError("suggest: the concept is empty")
    if top < 1:
        raise ValueError(f"suggest: top must be positive, got {top}")
    known = {c.name.casefold(): c for c in taxonomy.classes} if taxonomy is not None else {}
    entry = known.get(concept.casefold())
    # A word that is a superclass of the world names a family: erase its members, onto another anchor.
    members = [c for c in taxonomy.classes if c.superclass.casefold() == concept.casefold()] if taxonomy else []
    synonyms = list(entry.synonyms) if entry else [s for m in members for s in m.synonyms]
    words = vocabulary if vocabulary is not None else [c.name for c in taxonomy.classes] if taxonomy else []
    if not words:
        raise ValueError("suggest: no vocabulary to rank (give --vocabulary FILE, one word or phrase per line)")
    if wordnet is True:
        from sculpt.data.wordnet import WordNet, find_wordnet

        root = find_wordnet()
        wordnet = WordNet(root) if root is not None else None
    skip = {w.casefold() for w in [concept, *synonyms, *(m.name for m in members)]}
    if wordnet:  # a synonym or a kind of the concept is the concept, never a neighbour (sculpt.data.neighbours)
        for w in [concept, *synonyms]:
            skip |= wordnet.same_or_below(w)
    ranked = similarities(pipe, concept, [w for w in dict.fromkeys(words) if w.casefold() not in skip], template)
    notes = []
    if members:
        from collections import Counter

        superclasses = {c.superclass for c in taxonomy.classes} - {members[0].superclass}
        subgroup = Counter(m.subgroup for m in members).most_common(1)[0][0]
        superclass = subgroup if subgroup in superclasses else None
        reason = (f"a family of {len(members)} classes; the anchor is the superclass named by the Unicode subgroup "
                  f"most members share ({subgroup})" if superclass else
                  f"a family of {len(members)} classes; choose a safe anchor the model draws well")
    elif entry:
        superclass, reason = entry.superclass, "the taxonomy's superclass"
    elif ranked and ranked[0][0].casefold() in known:
        nearest = known[ranked[0][0].casefold()]
        superclass = nearest.superclass
        reason = f"the superclass of the most similar known class ({nearest.name}, {ranked[0][1]:.3f})"
    else:
        superclass, reason = _wordnet_superclass(pipe, concept, template, wordnet, notes)
        notes.append("no known synonyms either: list the words users would type for it")
    out = Suggestion(concept, superclass, reason, synonyms, ranked[:top], members=[m.name for m in members],
                     template=template, notes=notes)
    if superclass is not None:  # what the paper's method keeps by sculpt.data.neighbours.nearest's rule:
        from sculpt.methods.sculpting import NB_COUNT  # the nearest words, never the concept's or the superclass

        out.keep = [w for w, _ in ranked if w.casefold() != superclass.casefold()][:NB_COUNT]
    return out


def check_anchor(pipe, s: Suggestion, judge, data: DataConfig | None = None, n: int = 16, seed: int = 0) -> dict:
    """Draw n superclass pictures with and without the concept as negative prompt (the data's sampler)
    and judge them: the share in the superclass and the share showing the concept, for each, and
    what the anchor rule (sculpt.data.anchors) would keep. Stored on `s` and returned. With no judge
    (a real model without a classifier) the check is reported as unmeasured."""
    from sculpt.data.anchors import SUPERCLASS, needs_second_draw, shares
    from sculpt.eval.sampling import Job, SamplerSettings, generate
    from sculpt.models.loading import model_hash

    if s.superclass is None:
        raise ValueError("check_anchor: no superclass to check (choose one first)")
    spec = Concept(name=s.concept, superclass=s.superclass, synonyms=s.synonyms, members=s.members)
    unmeasured = {"how": "unmeasured: no classifier for this model's superclass; the paper's pictures"}
    if judge is None:
        s.anchor = unmeasured
        return s.anchor
    data = data or DataConfig()
    jobs = [Job(fill_template(s.template, s.superclass), seed + i) for i in range(n)]
    mhash = model_hash(pipe)
    verdicts = {}
    for label, negative in (("with_negative", spec.superclass_negative()), ("without_negative", "")):
        settings = SamplerSettings(steps=data.num_inference_steps, guidance=data.guidance_scale, negative_prompt=negative)
        verdicts[label] = judge(generate(pipe, jobs, settings, mhash), spec)
        if verdicts[label] is None:
            s.anchor = unmeasured
            return s.anchor
    both = needs_second_draw(verdicts["with_negative"])
    kept = sum(v.count(SUPERCLASS) for k, v in verdicts.items() if k == "with_negative" or both)
    s.anchor = {"n": n, **{k: shares(v) for k, v in verdicts.items()}, "kept": kept,
                "how": (f"in the superclass: {shares(verdicts['with_negative'])['superclass']:.0%} with the concept as "
                        f"negative prompt, {shares(verdicts['without_negative'])['superclass']:.0%} without "
                        f"(showing the concept: {shares(verdicts['without_negative'])['concept']:.0%}); the rule keeps "
                        f"{kept} pictures in the superclass and free of the concept"
                        + (", from both" if both else ", all drawn with the negative prompt"))}
    return s.anchor


def _wordnet_superclass(pipe, concept: str, template: str, wordnet, notes: list[str]) -> tuple[str | None, str]:
    """The WordNet hypernym of the concept most similar to it in the model's text space, and why."""
    if not wordnet:
        return None, ("no taxonomy for this model and no WordNet installed (apt-get install wordnet-base, or "
                      "$SCULPT_WORDNET): choose a superclass the model draws well")
    candidates = wordnet.hypernyms(concept, depth=5)
    if not candidates:
        return None, f"WordNet has no noun {concept!r}: choose a superclass the model draws well"
    ranked = similarities(pipe, concept, candidates, template, how="tokens")  # superclass words: unchanged rule
    notes.append("WordNet hypernyms by similarity: " + ", ".join(f"{w} {v:.3f}" for w, v in ranked[:6]))
    return ranked[0][0], f"the WordNet hypernym most similar to it in the model's text space ({ranked[0][1]:.3f})"
