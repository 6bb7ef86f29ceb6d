"""The emoji world's concept lists, fixed in one committed file (assets/lists.yaml) that every
experiment reads: which lists settings may be chosen on, and the sealed list that is only measured.

    from sculpt.emoji.lists import load_lists
    lists = load_lists()
    lists.development["heldout"]        # ['shark', 'guide dog', 'mobile phone', 'pick', 'school']
    lists.sealed                        # ten classes drawn by the file's seeded rule
    lists.unprotected_sibling("sealed", "radio")   # a sibling no method may distil for radio

Both draws are rules, not choices: `draw_sealed` and `draw_unprotected` recompute them from the
taxonomy and the file's seed, and the tests check that the file holds exactly what they give.

- **sealed**: the classes in no development list, no weapon, and whose superclass has another member
  in the world (so there is something to map them onto and a sibling to measure) are shuffled with
  numpy's default_rng(seed); walking that order, a class is taken when its superclass is not taken
  yet, until ten (one per superclass, as the ten targets are).
- **unprotected sibling** of concept c in list L: among c's siblings (same superclass) that are not in
  L and not weapons, the one drawn by default_rng([seed, id(c)]). No neighbour set of a run on L may
  hold it (`Concept.unprotected`), so its accuracy shows the damage nobody guarded against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import yaml

from sculpt.emoji.taxonomy import Taxonomy, load_taxonomy

LISTS_PATH = Path(__file__).resolve().parent / "assets" / "lists.yaml"
SEALED_SIZE = 10


@dataclass(frozen=True)
class ConceptLists:
    seed: int
    development: dict[str, list[str]]  # name -> concepts, in erasure order
    sealed: list[str]
    unprotected: dict[str, dict[str, str]]  # list name -> concept -> its unprotected sibling

    def names(self) -> list[str]:
        return [*self.development, "sealed"]

    def get(self, name: str) -> list[str]:
        if name == "sealed":
            return list(self.sealed)
        if name not in self.development:
            raise KeyError(f"no concept list named {name!r}; known: {', '.join(self.names())}")
        return list(self.development[name])

    def unprotected_sibling(self, list_name: str, concept: str) -> str:
        return self.unprotected[list_name][concept]

    def is_development(self, name: str) -> bool:
        return name in self.development


def draw_sealed(tax: Taxonomy, development: list[str], seed: int, size: int = SEALED_SIZE) -> list[str]:
    """The sealed list by the rule in the module docstring."""
    taken = {n.casefold() for n in development} | {n.casefold() for n in tax.weapon_names}
    members: dict[str, int] = {}
    for c in tax.classes:
        members[c.superclass] = members.get(c.superclass, 0) + 1
    candidates = [c for c in tax.classes if c.name.casefold() not in taken and members[c.superclass] > 1]
    out, used = [], set()
    for i in np.random.default_rng(seed).permutation(len(candidates)):
        c = candidates[int(i)]
        if c.superclass in used:
            continue
        out.append(c.name)
        used.add(c.superclass)
        if len(out) == size:
            return out
    raise ValueError(f"only {len(out)} classes fit the sealed-list rule; {size} wanted")


def draw_unprotected(tax: Taxonomy, concepts: list[str], seed: int) -> dict[str, str]:
    """Each concept's unprotected sibling by the rule in the module docstring."""
    in_list = {n.casefold() for n in concepts}
    weapons = {n.casefold() for n in tax.weapon_names}
    out = {}
    for name in concepts:
        siblings = [c.name for c in tax.neighbours_of(name)
                    if c.name.casefold() not in in_list and c.name.casefold() not in weapons]
        if not siblings:
            raise ValueError(f"{name!r} has no sibling outside its list to hold out")
        out[name] = siblings[int(np.random.default_rng([seed, tax[name].id]).integers(len(siblings)))]
    return out


@cache
def load_lists(path: Path = LISTS_PATH) -> ConceptLists:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    development = {k: list(v) for k, v in raw["development"].items()}
    unprotected = {k: dict(v) for k, v in raw["unprotected_siblings"].items()}
    return ConceptLists(seed=int(raw["seed"]), development=development, sealed=list(raw["sealed"]),
                        unprotected=unprotected)


def render_lists_file(seed: int, development: dict[str, list[str]], tax: Taxonomy | None = None) -> str:
    """The lists file's text for these development lists and seed (how assets/lists.yaml was written)."""
    tax = tax or load_taxonomy()
    dev_all = [n for names in development.values() for n in names]
    sealed = draw_sealed(tax, dev_all, seed)
    lists = {**development, "sealed": sealed}
    body = {
        "seed": seed,
        "development": development,
        "sealed": sealed,
        "unprotected_siblings": {name: draw_unprotected(tax, names, seed) for name, names in lists.items()},
    }
    head = (
        "# The emoji world's concept lists (issue 25). Written once by sculpt.emoji.lists.render_lists_file;\n"
        "# the sealed list and the unprotected siblings are drawn by the rules in sculpt/emoji/lists.py from\n"
        "# the seed below, and tests check that this file holds exactly what the rules give.\n"
        "# Settings, thresholds and defaults are chosen on the development lists only. The sealed list is\n"
        "# measured, never tuned on. No neighbour set of a run on a list may hold an unprotected sibling.\n"
    )
    return head + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100)


if __name__ == "__main__":  # python -m sculpt.emoji.lists > src/sculpt/emoji/assets/lists.yaml
    tax = load_taxonomy()
    print(render_lists_file(2026, {
        "targets": list(tax.target_names),
        "protocol1": ["trumpet", "rabbit", "bus", "strawberry", "house"],
        "heldout": ["shark", "guide dog", "mobile phone", "pick", "school"],
    }, tax), end="")
