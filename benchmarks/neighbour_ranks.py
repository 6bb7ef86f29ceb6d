"""Which similarity ranks the classes that erasures measurably hurt highest? (issue 25)

    python benchmarks/neighbour_ranks.py

The hurt classes are measured facts from earlier runs (docs/results.md, "`sculpt suggest`: do the
neighbours it ranks first get hurt?": the ten-target erasure without the neighbour term, and the
weapons family), not chosen here. For each erased concept, every other class of the emoji world is
ranked by each rule of sculpt.data.neighbours.SIMILARITIES; a hurt class's rank is its place in that
list (1 = nearest). Prints one JSON line per rule: the ranks and their median over the target pairs
(the ten targets are a development list: the rule is chosen on these), the weapons family's ranks
(the unsafe family is reported, not tuned on: shown, not used for the choice) and the median over all
eight pairs.
"""

from __future__ import annotations

import json
import statistics

HURT = {  # erased -> classes measurably hurt by its erasure (docs/results.md)
    "tropical fish": ["blowfish", "fish"],
    "carpentry saw": ["hammer", "wrench"],
    "videocassette": ["radio"],
    "flag in hole": ["basketball"],
}
HURT_FAMILY = {"weapon": ["dog", "basketball"]}


def main() -> None:
    from sculpt.data.neighbours import SIMILARITIES, similarities
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.models.loading import load_pipeline

    pipe = load_pipeline("emoji")
    tax = load_taxonomy()
    for how in SIMILARITIES:
        ranks, family = {}, {}
        for concept, hurt in {**HURT, **HURT_FAMILY}.items():
            erased = set(tax.weapon_names) if concept == "weapon" else {concept}
            words = [c.name for c in tax.classes if c.name not in erased]
            ranked = [w for w, _ in similarities(pipe, concept, words, how=how)]
            for h in hurt:
                (family if concept == "weapon" else ranks)[f"{concept} -> {h}"] = (ranked.index(h) + 1, len(words))
        print(json.dumps({"similarity": how, "median_rank": statistics.median(r for r, _ in ranks.values()),
                          "median_rank_all": statistics.median(r for r, _ in [*ranks.values(), *family.values()]),
                          "ranks": ranks, "family_ranks": family}), flush=True)


if __name__ == "__main__":
    main()
