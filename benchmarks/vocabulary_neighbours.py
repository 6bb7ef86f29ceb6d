"""The ten Imagenette targets' neighbours on the shipped vocabulary (issue 25), for a reader to judge.

    python benchmarks/vocabulary_neighbours.py [--k 4]

No Stable Diffusion text encoder can be had here, so the ranking uses the emoji pipeline's frozen
text encoder (all-MiniLM-L6-v2, a real language model) with the default rule of
sculpt.data.neighbours (pooled real-token states). For each target: the k neighbours the method would
keep, and the words the WordNet rule removed from the top of the ranking (the concept's lemma
synonyms and hyponyms: what would otherwise keep the concept alive). Needs WordNet
(`apt-get install wordnet-base` or $SCULPT_WORDNET).
"""

from __future__ import annotations

import argparse

TARGETS = {"tench": "fish", "English springer": "dog", "cassette player": "electronic device",
           "chain saw": "tool", "church": "building", "French horn": "musical instrument",
           "garbage truck": "vehicle", "gas pump": "energy equipment", "golf ball": "sports equipment",
           "parachute": "safety gear"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()

    from sculpt.config import Concept
    from sculpt.data.neighbours import VOCABULARY_PATH, not_neighbours, read_vocabulary, similarities
    from sculpt.data.wordnet import WordNet, find_wordnet
    from sculpt.models.loading import load_pipeline

    root = find_wordnet()
    if root is None:
        raise SystemExit("no WordNet: apt-get install wordnet-base (or set $SCULPT_WORDNET)")
    wn, pipe = WordNet(root), load_pipeline("emoji")
    vocab = read_vocabulary(VOCABULARY_PATH)
    print(f"| target | neighbours kept (k = {args.k}) | removed by the WordNet rule |")
    print("|---|---|---|")
    for name, superclass in TARGETS.items():
        concept = Concept(name=name, superclass=superclass)
        ranked = similarities(pipe, name, [w for w in vocab if w.casefold() != name.casefold()])
        plain = not_neighbours(concept, set())
        skip = not_neighbours(concept, set(), wordnet=wn)
        kept = [w for w, _ in ranked if w.casefold() not in skip][: args.k]
        top = [w for w, _ in ranked if w.casefold() not in plain][: args.k + 10]
        removed = [w for w in top if w.casefold() in skip]
        print(f"| {name} | {', '.join(kept)} | {', '.join(removed) or '-'} |")


if __name__ == "__main__":
    main()
