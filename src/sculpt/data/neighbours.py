"""The neighbours at risk of a concept: the concepts to keep that the model reads most like it.

The erasure edits the cross-attention projections, which read the text encoder's token states of a
prompt. Prompts that the model treats like the concept's move with it (in the emoji world, erasing
"poodle" takes "dog" and "guide dog" down first). Three ways to rank the words w of a
vocabulary (`SIMILARITIES`, `data.neighbour_similarity` in a spec):

    "tokens" (the default): cos of the flattened padded token states of the two prompts, exactly what
        cross-attention reads position by position
    "pooled": the mean of the prompt's real token states (no padding), centred on the mean over the
        vocabulary: sim(w) = cos( m(concept) - mu, m(w) - mu ),   m(p) = mean of p's unpadded states
    "predictions": what the UNet does with the prompt, its guidance direction
        d(p) = eps_theta(x_t, t; p) - eps_theta(x_t, t; "")     on fixed noise latents x_t, t in T_SIM

"pooled" ranks by meaning (church -> office building, house, school, castle in the emoji world;
"tokens": house, dog, pizza, fish, prompts of the same token count). But the question is which
classes an erasure *hurts*, and on the measured (erased, hurt) pairs of the ten targets, a development
list (benchmarks/neighbour_ranks.py, docs/results.md "Neighbours by meaning"), the hurt classes' median
rank is 9.0 with "tokens", 8.5 with "pooled" and 15 with "predictions": no rule ranks them higher than
the old one by more than half a place in six pairs, so the default stays "tokens". (On the weapons
family, reported and not used for the choice, "tokens" ranks its hurt classes dog and basketball 3rd and
14th, "pooled" 24th and 36th: the edit moves the prompts whose states line up with the concept's,
whatever they mean.) What meaning decides is what can never be a neighbour.
Whatever the ranking, a neighbour is never a word that *is* the concept: its name, synonyms
and members, WordNet's lemma synonyms and hyponyms of it (`not_neighbours`), a word the
run erases, the superclass (kept by the method already), or a class the run holds out
(`RunConfig.unprotected`). And a neighbour whose own pictures the model itself reads as the concept
(`looks_like`: on most of them its denoising error is lower under the concept's prompt than under the
neighbour's own) is dropped once its pictures are drawn: distilling it would keep a way to draw the
concept. `sculpt suggest` shows the ranking; neighbour-aware methods preserve the top k (the spec's
`neighbours` list overrides it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sculpt.config import Concept, fill_template

VOCABULARY_PATH = Path(__file__).resolve().parent / "vocabulary.txt"


def read_vocabulary(path: str | Path) -> list[str]:
    """One word or phrase per line; blank lines and '#' comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary {path}: no such file (one word or phrase per line)")
    words = [w.strip() for w in path.read_text().splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise ValueError(f"vocabulary {path}: no words in it")
    return list(dict.fromkeys(words))


def default_vocabulary(model: str, path: str | Path | None = None) -> list[str]:
    """The given file; else the emoji world's class names for "emoji", the shipped list otherwise."""
    if path is not None:
        return read_vocabulary(path)
    if model == "emoji":
        from sculpt.emoji.taxonomy import load_taxonomy

        return [c.name for c in load_taxonomy().classes]
    return read_vocabulary(VOCABULARY_PATH)


SIMILARITIES = ("tokens", "pooled", "predictions")
T_SIM = (999, 700)  # timesteps of the guidance directions: the early steps, where a picture's class is decided
N_SIM_LATENTS = 8


@torch.no_grad()
def prompt_vectors(pipe, prompts: list[str], how: str = "tokens", seed: int = 0) -> torch.Tensor:
    """[P, F] one vector per prompt, compared by cosine (see the module docstring)."""
    from sculpt.data.prepare import encode_prompts, encode_unconditional

    if how not in SIMILARITIES:
        raise ValueError(f"unknown similarity {how!r}; one of {', '.join(SIMILARITIES)}")
    embeds = encode_prompts(pipe, prompts)
    if how == "tokens":
        return embeds.flatten(1)
    if how == "pooled":
        from sculpt.models.conditioning import conditioning

        states = conditioning(pipe).tokens(embeds)
        mask = pipe.tokenizer(prompts, padding="max_length", max_length=states.shape[1], truncation=True,
                              return_tensors="pt").attention_mask[:, :, None].to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled - pooled.mean(0, keepdim=True)
    from sculpt.models.conditioning import conditioning

    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    cond = conditioning(pipe)
    g = torch.Generator().manual_seed(seed)
    shape = (N_SIM_LATENTS, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.randn(shape, generator=g).to(device, dtype)
    empty = encode_unconditional(pipe)
    out = []
    for p in range(len(prompts)):
        emb = torch.cat([embeds[p : p + 1], empty]).to(device, dtype)
        parts = []
        for t in T_SIM:
            tt = torch.full((2 * N_SIM_LATENTS,), t, device=device)
            e = emb.repeat_interleave(N_SIM_LATENTS, 0)
            xx = x.repeat(2, 1, 1, 1)
            eps = unet(xx, tt, **cond.unet_inputs(e, xx)).sample.float()
            parts.append((eps[:N_SIM_LATENTS] - eps[N_SIM_LATENTS:]).flatten())
        out.append(torch.cat(parts).cpu())
    return torch.stack(out)


def similarities(pipe, concept: str, words: list[str], template: str = "a photo of a {}",
                 how: str = "tokens") -> list[tuple[str, float]]:
    """sim(concept, w) for each word by the rule `how`, most similar first."""
    prompts = [fill_template(template, w) for w in [concept, *words]]
    vectors = prompt_vectors(pipe, prompts, how)
    sims = torch.nn.functional.cosine_similarity(vectors[:1], vectors[1:])
    return sorted(zip(words, sims.tolist()), key=lambda x: -x[1])


def not_neighbours(concept: Concept, erased: set[str], held_out: set[str] = frozenset(), wordnet=None) -> set[str]:
    """Casefolded words that may never be kept as the concept's neighbours: what the run erases, the
    concept's own words, its superclass (kept by the method already), the run's held-out classes, and,
    with a WordNet, every lemma synonym and hyponym of the concept's words (a kind of the concept is
    the concept: keeping "cathedral" keeps a way to draw "church")."""
    skip = {w.casefold() for w in (*erased, *held_out, *concept.words, concept.superclass)}
    if wordnet is not None:
        for w in concept.words:
            skip |= wordnet.same_or_below(w)
    return skip


def nearest(pipe, concept: Concept, vocabulary: list[str], k: int, exclude: set[str],
            template: str = "a photo of a {}", how: str = "tokens") -> list[tuple[str, float]]:
    """The k words of the vocabulary nearest the concept, none of them in `exclude` (casefolded;
    `not_neighbours` gives the run's)."""
    if k <= 0:
        return []
    skip = {w.casefold() for w in exclude}
    # Ranked against the whole vocabulary (the pooled rule centres on what it compares), then filtered:
    # a concept's neighbours do not depend on what else the run erases.
    words = [w for w in vocabulary if w.casefold() != concept.name.casefold()]
    return [(w, v) for w, v in similarities(pipe, concept.name, words, template, how) if w.casefold() not in skip][:k]


def default_siblings(model: str) -> dict[str, list[str]]:
    """superclass -> its classes, where the model's world has a taxonomy (the emoji world); {} otherwise."""
    if model != "emoji":
        return {}
    from sculpt.emoji.taxonomy import load_taxonomy

    out: dict[str, list[str]] = {}
    for c in load_taxonomy().classes:
        out.setdefault(c.superclass.casefold(), []).append(c.name)
    return out


def run_neighbours(pipe, concepts: list[Concept], erased: list[Concept], k: int, vocabulary: list[str],
                   template: str, siblings: dict[str, list[str]] | None = None, held_out: list[str] = (),
                   wordnet=None, how: str = "tokens") -> dict[str, list[tuple[str, float | None]]]:
    """Each concept's neighbours to keep: its spec's list (similarity not computed), else the k nearest
    of the vocabulary, preceded, when `siblings` (superclass -> classes) is given, by the concept's
    siblings under its superclass. Nothing in `not_neighbours` (what the run erases: every concept of
    the run and of the patches it stacks on, with their synonyms and members; the held-out classes;
    WordNet's synonyms and hyponyms of the concept) is ever a neighbour."""
    erased_words = {w for c in erased for w in c.words}
    out = {}
    for c in concepts:
        if c.neighbours is not None:
            clash = [w for w in c.neighbours if w.casefold() in {x.casefold() for x in erased_words}]
            if clash:
                raise ValueError(f"concept {c.name!r}: neighbour(s) {', '.join(map(repr, clash))} are erased by this "
                                 "run or the patches it stacks on: a concept cannot be both kept and erased")
            out[c.name] = [(w, None) for w in c.neighbours]
        else:
            skip = not_neighbours(c, erased_words, set(held_out), wordnet)
            near = nearest(pipe, c, vocabulary, k, skip, template, how)
            skip |= {w.casefold() for w, _ in near}
            sib = [w for w in (siblings or {}).get(c.superclass.casefold(), []) if w.casefold() not in skip]
            out[c.name] = [(w, None) for w in sib] + near
    return out


LOOKALIKE_TIMESTEPS = (100, 300, 500, 700, 900)


def looks_like(pipe, concept: Concept, latents: torch.Tensor, own_prompt: str, template: str) -> float:
    """The share of a neighbour's pictures (latents) that the model explains better as the concept than
    as themselves: err(concept prompt) < err(own prompt), the diffusion-classifier test of
    sculpt.presence on the same noise and timesteps. Above one half, the neighbour looks like the concept."""
    from sculpt.data.prepare import encode_prompts
    from sculpt.presence import errors

    err = errors(pipe, latents, encode_prompts(pipe, [fill_template(template, concept.name), own_prompt]),
                 LOOKALIKE_TIMESTEPS)
    return float((err[0] < err[1]).float().mean())


def drop_lookalikes(pipe, neighbours: dict[str, list], concepts: list[Concept], data: dict, template: str,
                    spec_lists: set[str] = frozenset()) -> dict[str, list[tuple[str, float]]]:
    """Remove the neighbours that look like an erased concept (`looks_like` > 1/2) from every concept's
    list, in place: a stage distils the lists of all concepts erased so far, so a look-alike of one
    concept kept for another would keep it drawable all the same. A list the spec wrote by hand
    (`spec_lists`) is the operator's and is kept. Returns what was dropped, per concept it looks like."""
    dropped: dict[str, list[tuple[str, float]]] = {}
    for c in concepts:
        for w, _ in neighbours.get(c.name, []):
            share = looks_like(pipe, c, data[w].latents, fill_template(template, w), template)
            if share > 0.5:
                dropped.setdefault(c.name, []).append((w, round(share, 3)))
    gone = {w for words in dropped.values() for w, _ in words}
    for name in neighbours:
        if name not in spec_lists:
            neighbours[name] = [(w, sim) for w, sim in neighbours[name] if w not in gone]
    return dropped
