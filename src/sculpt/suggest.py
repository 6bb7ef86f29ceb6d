"""`sculpt suggest`: before erasing a concept, what it maps onto and what its erasure may hurt.

The erasure edits the cross-attention projections, which act on the text encoder's token states of
a prompt. Prompts whose states lie close to the concept's are moved with it: those are the
*neighbours at risk*. For each word of a vocabulary (the benchmark's classes, or the user's list)
this ranks

    sim(w) = cos( E("a photo of a <concept>"), E("a photo of a <w>") ),   E = the token states, flattened

the same states the UNet reads, so the ranking is the model's own, not a general word similarity.
It also proposes a superclass (the taxonomy's for a known class, else the superclass of the most
similar known class) and the known synonyms. What it proposes is a starting point for the spec,
not a decision: the operator names the concept and chooses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sculpt.config import fill_template
from sculpt.data.prepare import encode_prompts


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

    def spec_yaml(self) -> str:
        """A concept entry to paste into a spec."""
        lines = [f"  - name: {self.concept}", f"    superclass: {self.superclass or '<choose one>'}"]
        if self.members:
            lines.append(f"    members: [{', '.join(self.members)}]")
        if self.synonyms:
            lines.append(f"    synonyms: [{', '.join(self.synonyms)}]")
        return "\n".join(lines)


def similarities(pipe, concept: str, words: list[str], template: str = "a photo of a {}") -> list[tuple[str, float]]:
    """cos(E(concept prompt), E(word prompt)) for each word, most similar first."""
    prompts = [fill_template(template, w) for w in [concept, *words]]
    with torch.no_grad():
        states = encode_prompts(pipe, prompts).flatten(1)
    sims = torch.nn.functional.cosine_similarity(states[:1], states[1:])
    return sorted(zip(words, sims.tolist()), key=lambda x: -x[1])


def suggest(concept: str, pipe, vocabulary: list[str] | None = None, taxonomy=None, top: int = 8,
            template: str = "a photo of a {}") -> Suggestion:
    """Propose a superclass, synonyms and the neighbours at risk for `concept`.

    vocabulary: the words to rank (default: the taxonomy's class names). taxonomy: the emoji world's
    (sculpt.emoji.taxonomy.load_taxonomy()) or None for a real model, where the superclass is left to
    the operator unless the vocabulary holds close words."""
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
    skip = {w.casefold() for w in [concept, *synonyms, *(m.name for m in members)]}
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
        superclass, reason = None, "no taxonomy for this model: choose a superclass the model draws well"
        notes.append("no known synonyms either: list the words users would type for it")
    return Suggestion(concept, superclass, reason, synonyms, ranked[:top], members=[m.name for m in members],
                      template=template, notes=notes)
