"""The neighbours at risk of a concept: the concepts to keep that sit nearest it in the model's text space.

The erasure edits the cross-attention projections, which read the text encoder's token states of a
prompt. Prompts whose states lie close to the concept's move with it (in the emoji world, erasing
"poodle" takes "dog" and "guide dog" down first). For each word w of a vocabulary,

    sim(w) = cos( E(template(concept)), E(template(w)) ),   E = the token states, flattened

the same states the UNet reads, so the ranking is the model's own. `sculpt suggest` shows it;
neighbour-aware methods preserve the top k (the spec's `neighbours` list overrides the ranking).
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


def similarities(pipe, concept: str, words: list[str], template: str = "a photo of a {}") -> list[tuple[str, float]]:
    """cos(E(concept prompt), E(word prompt)) for each word, most similar first."""
    from sculpt.data.prepare import encode_prompts

    prompts = [fill_template(template, w) for w in [concept, *words]]
    with torch.no_grad():
        states = encode_prompts(pipe, prompts).flatten(1)
    sims = torch.nn.functional.cosine_similarity(states[:1], states[1:])
    return sorted(zip(words, sims.tolist()), key=lambda x: -x[1])


def nearest(pipe, concept: Concept, vocabulary: list[str], k: int, exclude: set[str],
            template: str = "a photo of a {}") -> list[tuple[str, float]]:
    """The k words of the vocabulary nearest the concept, none of them a word of `exclude` (casefolded:
    what the run erases, in any stage) nor the concept's superclass (which the method keeps already)."""
    if k <= 0:
        return []
    skip = {w.casefold() for w in exclude} | {w.casefold() for w in concept.words} | {concept.superclass.casefold()}
    words = [w for w in vocabulary if w.casefold() not in skip]
    return similarities(pipe, concept.name, words, template)[:k]


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
                   template: str, siblings: dict[str, list[str]] | None = None) -> dict[str, list[tuple[str, float | None]]]:
    """Each concept's neighbours to keep: its spec's list (similarity not computed), else the k nearest
    of the vocabulary, preceded, when `siblings` (superclass -> classes) is given, by the concept's
    siblings under its superclass. Nothing the run erases (`erased`: every concept of the run and of
    the patches it stacks on, with their synonyms and members) is ever a neighbour."""
    exclude = {w for c in erased for w in c.words}
    out = {}
    for c in concepts:
        if c.neighbours is not None:
            clash = [w for w in c.neighbours if w.casefold() in {x.casefold() for x in exclude}]
            if clash:
                raise ValueError(f"concept {c.name!r}: neighbour(s) {', '.join(map(repr, clash))} are erased by this "
                                 "run or the patches it stacks on: a concept cannot be both kept and erased")
            out[c.name] = [(w, None) for w in c.neighbours]
        else:
            near = nearest(pipe, c, vocabulary, k, exclude, template)
            skip = {x.casefold() for x in exclude} | {w.casefold() for w, _ in near} | {c.superclass.casefold()}
            sib = [w for w in (siblings or {}).get(c.superclass.casefold(), []) if w.casefold() not in skip]
            out[c.name] = [(w, None) for w in sib] + near
    return out
