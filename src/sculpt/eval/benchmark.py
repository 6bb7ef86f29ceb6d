"""What is measured: the classes, their prompts and words, the reference pictures, the unsafe prompts.

A Benchmark names every class the classifier knows (by its label there), the canonical prompt that
asks the model to draw it, its superclass, its synonyms and held-out paraphrases (leakage), an
optional source of real pictures per class (the FID reference), and optional implicit unsafe
prompts with the classes a detector should count on them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class EvalClass:
    name: str
    label: str  # the classifier's label for it
    prompt: str  # what evaluation asks the model to draw, "a photo of a poodle"
    superclass: str | None = None
    synonyms: tuple[str, ...] = ()  # words used in training captions
    paraphrases: tuple[str, ...] = ()  # held out: never a caption, understood by the text encoder


@dataclass
class Benchmark:
    name: str
    classes: list[EvalClass]
    targets: list[str] = field(default_factory=list)  # evaluated as "forgetting" when nothing is erased
    # reference(class_name, n, seed) -> n real pictures of the class, for FID / KID
    reference: Callable[[str, int, int], list[Image.Image]] | None = None
    unsafe_prompts: tuple[str, ...] = ()
    unsafe_classes: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> EvalClass:
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no class {name!r}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def superclass_members(self, name: str, superclass: str | None = None) -> list[EvalClass]:
        """The classes under `name`'s superclass (or under `superclass`, when given)."""
        sup = superclass if superclass is not None else self[name].superclass
        return [c for c in self.classes if sup is not None and c.superclass == sup]

    def find(self, word: str) -> str | None:
        """The class named `word` (case-insensitive), or None."""
        return next((c.name for c in self.classes if c.name.casefold() == word.strip().casefold()), None)

    def resolve(self, concept: dict) -> "Resolution":
        """Which classes measure an erased concept (a spec's fields: name, members, synonyms):
        the class of its name and of each member; a concept that is no class and lists no members is
        measured through those of its synonyms that name classes (a family written as synonyms)."""
        name, members = concept["name"], list(concept.get("members") or [])
        if self.find(name) is not None or members:
            words, how = ([name] if self.find(name) else []) + members, "name and members" if members else "name"
        else:
            words = [w for w in concept.get("synonyms") or [] if self.find(w)]
            how = "synonyms that name benchmark classes" if words else "no class of the benchmark"
        found = list(dict.fromkeys(self.find(w) for w in words if self.find(w)))
        missing = [w for w in ([name] if not words else words) if self.find(w) is None]
        sup = concept.get("superclass")
        return Resolution(name, tuple(found), tuple(missing), how,
                          sup if any(c.superclass == sup for c in self.classes) else None)


@dataclass(frozen=True)
class Resolution:
    """What the evaluation measures for one erased concept, said per concept in metrics.json."""

    concept: str
    classes: tuple[str, ...]  # benchmark classes measured as erased (never counted as kept)
    not_measured: tuple[str, ...]  # its name or members that no benchmark class matches
    how: str
    superclass: str | None = None  # the spec's superclass, when the benchmark has classes under it


def photo_prompt(text: str) -> str:
    """'a photo of ...' for a word ("a photo of a clownfish") or a phrase that has its article."""
    from sculpt.emoji.dataset import class_prompt

    if text.split(" ", 1)[0] in {"a", "an", "the", "some"}:
        return f"a photo of {text}"
    return class_prompt(text)


def emoji_benchmark() -> Benchmark:
    """The emoji world: 62 classes, the ten targets, weapons on implicit prompts, renders as reference."""
    from sculpt.emoji.dataset import ATLAS_PATH, class_prompt, render
    from sculpt.emoji.taxonomy import load_taxonomy

    tax = load_taxonomy()
    classes = [
        EvalClass(c.name, c.name, class_prompt(c.name), c.superclass, tuple(photo_prompt(s) for s in c.synonyms),
                  tuple(photo_prompt(p) for p in tax.heldout_paraphrases.get(c.name, ())))
        for c in tax.classes
    ]

    def reference(name: str, n: int, seed: int) -> list[Image.Image]:
        # Seeds far from the training stream's (which starts at 0) so these are unseen renders.
        return [render(tax[name].id, 10_000_000 + seed + i) for i in range(n)]

    reference.fingerprint = f"emoji renders {_file_digest(ATLAS_PATH)}"  # what the metrics cache keys on
    return Benchmark("emoji", classes, list(tax.target_names), reference,
                     tuple(tax.implicit_weapon_prompts), tuple(tax.weapon_names))


# The paper's ten Imagenette classes and their ImageNet-1k labels (as microsoft/resnet-50 names them).
IMAGENETTE = {
    "tench": "tench, Tinca tinca",
    "English springer": "English springer, English springer spaniel",
    "cassette player": "cassette player",
    "chain saw": "chain saw, chainsaw",
    "church": "church, church building",
    "French horn": "French horn, horn",
    "garbage truck": "garbage truck, dustcart",
    "gas pump": "gas pump, gasoline pump, petrol pump, island dispenser",
    "golf ball": "golf ball",
    "parachute": "parachute, chute",
}


def imagenette_benchmark() -> Benchmark:
    """Imagenette on a real SD model with an ImageNet classifier (TransformersClassifier)."""
    classes = [EvalClass(name, label, f"a photo of a {name}") for name, label in IMAGENETTE.items()]
    return Benchmark("imagenette", classes, list(IMAGENETTE))


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def folder_reference(root: str | Path) -> Callable[[str, int, int], list[Image.Image]]:
    """Real pictures for FID / KID from an ImageFolder-style tree, root/<class name>/*.png|jpg: class
    c's first n pictures in name order (the seed is unused: a folder is already a fixed sample)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such reference folder (expected {root}/<class name>/*.png)")

    listing = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)

    def reference(name: str, n: int, seed: int) -> list[Image.Image]:
        files = sorted(p for p in (root / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        pictures = []
        for path in files[:n]:
            with Image.open(path) as im:
                pictures.append(im.convert("RGB"))
        return pictures

    reference.fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()  # the metrics cache's key
    return reference


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
