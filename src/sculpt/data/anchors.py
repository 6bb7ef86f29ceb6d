"""Which superclass images a concept is mapped onto: the measured anchor rule.

The paper draws the superclass (anchor) images with the concept as negative prompt, so that they do
not show the concept: an anchor that still shows it teaches the model nothing (in the emoji world,
without it, up to a fifth of "energy equipment" pictures are fuel pumps, and erasing onto them
leaves the concept in place). But where the concept's text sits very close to its superclass's,
subtracting it removes the superclass too ("a photo of a dog" with "poodle" as negative prompt gives
no dog at all), and the concept is then mapped onto pictures of nothing in particular.

The rule, the same for every concept and every method, applied when the data is made, with a judge
(a classifier that knows the superclass's classes) that calls each anchor picture "superclass" (a
class under the superclass that is neither the concept nor one of its members), "concept" or "other":

    draw N anchor pictures with the concept as negative prompt (the paper)
    keep those judged "superclass"                      (in the superclass and free of the concept)
    if fewer than MIN_SUPERCLASS_SHARE * N are kept:    (the negative prompt removed the superclass)
        draw N more without a negative prompt (the same seeds) and keep theirs judged "superclass" too
    if fewer than MIN_ANCHORS are kept in all: the paper's N pictures, unfiltered

MIN_SUPERCLASS_SHARE = 1/2 (a majority) and MIN_ANCHORS = 4 are rules, not values fitted to results.
With no judge (a real model without a classifier) nothing can be measured: the paper's negative
prompt, unfiltered, and the ledger says "unmeasured". What was measured and kept is recorded with the
data (the per-picture verdicts included).

Why filter rather than choose one of the two: in the emoji world neither is clean for most concepts.
"a photo of an animal" minus "rabbit" is an animal in 22% of pictures; without the negative prompt
it is an animal in 66%, and a rabbit in 31% (development list, 32 pictures), and an erasure mapped
onto rabbit pictures keeps drawing rabbits (0.44-0.69 accuracy left after erasing it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from sculpt.config import Concept

MIN_SUPERCLASS_SHARE = 0.5


SUPERCLASS, CONCEPT, OTHER = "superclass", "concept", "other"
MIN_ANCHORS = 4


class AnchorJudge(Protocol):
    """Pictures of a concept's superclass in, a verdict per picture out (SUPERCLASS, CONCEPT or OTHER);
    None when it cannot tell for this concept (its superclass is not among its labels)."""

    fingerprint: str  # identifies the judge (its weights): part of the data's cache key

    def __call__(self, images: list[Image.Image], concept: Concept) -> list[str] | None: ...


@dataclass
class ClassifierJudge:
    """A judge from a benchmark (class names, superclasses) and its classifier."""

    benchmark: object  # sculpt.eval.benchmark.Benchmark
    classifier: object  # sculpt.eval.classifiers.Classifier
    fingerprint: str

    def classes(self, concept: Concept) -> tuple[list[str], list[str]] | None:
        """(labels counted as the superclass, labels counted as the concept), or None."""
        bench = self.benchmark
        own = {bench.find(w) for w in concept.words} - {None}
        superclass = [c for c in bench.classes if c.superclass is not None
                      and c.superclass.casefold() == concept.superclass.casefold() and c.name not in own]
        if not superclass:
            return None
        return [c.label for c in superclass], [bench[n].label for n in own]

    def __call__(self, images: list[Image.Image], concept: Concept) -> list[str] | None:
        labels = self.classes(concept)
        if labels is None or not images:
            return None
        sup, own = ({self.classifier.label_id(x) for x in group} for group in labels)
        return [SUPERCLASS if p in sup else CONCEPT if p in own else OTHER
                for p in self.classifier.predict(images).tolist()]


def shares(verdicts: list[str]) -> dict[str, float]:
    """The share of pictures in the superclass and the share showing the concept."""
    n = max(len(verdicts), 1)
    return {"superclass": round(verdicts.count(SUPERCLASS) / n, 4), "concept": round(verdicts.count(CONCEPT) / n, 4)}


def default_judge(model: str) -> AnchorJudge | None:
    """The emoji world's classifier for "emoji"; None for a real model (no classifier is assumed)."""
    if model != "emoji":
        return None
    import hashlib

    from sculpt.emoji.classifier import WEIGHTS_PATH
    from sculpt.eval.evaluate import default_benchmark_and_classifier

    bench, clf = default_benchmark_and_classifier("emoji")
    digest = hashlib.sha256(WEIGHTS_PATH.read_bytes()).hexdigest()[:16]
    return ClassifierJudge(bench, clf, f"emoji classifier {digest}")


def needs_second_draw(verdicts: list[str]) -> bool:
    """Fewer than MIN_SUPERCLASS_SHARE of the negative-prompt pictures are in the superclass."""
    return verdicts.count(SUPERCLASS) < MIN_SUPERCLASS_SHARE * len(verdicts)


RULE = ("anchor pictures judged in the superclass and free of the concept, drawn with the concept as negative "
        f"prompt, and also without it when fewer than {MIN_SUPERCLASS_SHARE:.0%} pass; the paper's pictures "
        f"unfiltered when fewer than {MIN_ANCHORS} pass")
