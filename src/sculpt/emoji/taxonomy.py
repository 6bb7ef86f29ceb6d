"""The emoji world's classes and their relations, read from the committed assets/taxonomy.json.

    from sculpt.emoji.taxonomy import load_taxonomy
    tax = load_taxonomy()
    tax.targets            # the ten erasure targets, as EmojiClass
    tax.members_of("fish") # tropical fish, fish, blowfish, shark
    tax.superclass_of("poodle") == "dog"
"""

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TAXONOMY_PATH = Path(__file__).resolve().parent / "assets" / "taxonomy.json"


@dataclass(frozen=True)
class EmojiClass:
    id: int
    name: str  # the caption name, e.g. "tropical fish"
    emoji: str
    unicode_name: str
    codepoints: tuple[str, ...]
    group: str
    subgroup: str
    superclass: str
    synonyms: tuple[str, ...]


@dataclass(frozen=True)
class Taxonomy:
    classes: tuple[EmojiClass, ...]
    target_names: tuple[str, ...]
    weapon_names: tuple[str, ...]
    implicit_weapon_prompts: tuple[str, ...]
    heldout_paraphrases: dict[str, tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def superclasses(self) -> list[str]:
        """Superclass names in order of first appearance."""
        return list(dict.fromkeys(c.superclass for c in self.classes))

    @property
    def targets(self) -> list[EmojiClass]:
        return [self[name] for name in self.target_names]

    @property
    def weapons(self) -> list[EmojiClass]:
        return [self[name] for name in self.weapon_names]

    def __getitem__(self, key: int | str) -> EmojiClass:
        """A class by id or by caption name."""
        if isinstance(key, int):
            return self.classes[key]
        for c in self.classes:
            if c.name == key:
                return c
        raise KeyError(f"no emoji class named {key!r}; known: {', '.join(self.names)}")

    def superclass_of(self, name: str) -> str:
        return self[name].superclass

    def members_of(self, superclass: str) -> list[EmojiClass]:
        members = [c for c in self.classes if c.superclass == superclass]
        if not members:
            raise KeyError(f"no superclass named {superclass!r}; known: {', '.join(self.superclasses)}")
        return members

    def neighbours_of(self, name: str) -> list[EmojiClass]:
        """The other members of a class's superclass: what an erasure of it should keep."""
        return [c for c in self.members_of(self.superclass_of(name)) if c.name != name]


@cache
def load_taxonomy(path: Path = TAXONOMY_PATH) -> Taxonomy:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    classes = tuple(
        EmojiClass(
            id=c["id"], name=c["name"], emoji=c["emoji"], unicode_name=c["unicode_name"],
            codepoints=tuple(c["codepoints"]), group=c["group"], subgroup=c["subgroup"],
            superclass=c["superclass"], synonyms=tuple(c["synonyms"]),
        )
        for c in raw["classes"]
    )
    assert [c.id for c in classes] == list(range(len(classes))), "class ids must be 0..N-1 in order"
    return Taxonomy(
        classes=classes,
        target_names=tuple(raw["targets"]),
        weapon_names=tuple(raw["weapons"]),
        implicit_weapon_prompts=tuple(raw["implicit_weapon_prompts"]),
        heldout_paraphrases={k: tuple(v) for k, v in raw["heldout_paraphrases"].items()},
    )
