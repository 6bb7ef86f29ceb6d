"""The retrained reference ("oracle") of a concept list, measured like an erased model (issue 27).

    python benchmarks/oracle_eval.py LIST [--n 50] [--out runs/oracle]

Loads src/sculpt/emoji/weights/oracle-LIST (scripts/emoji_oracle.sh: the shipped recipe, 8000 steps,
without the pictures of LIST's classes) and evaluates it against the shipped model with the emoji
world's evaluation (N pictures per class prompt, seeds 0..N-1): accuracy on the left-out classes (what
"forgotten" looks like when it is exact) and on every other class, before (the shipped model) and
after (the oracle). Prints one JSON line and appends it to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("list")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--out", default="runs/oracle")
    args = ap.parse_args()

    from sculpt.emoji.lists import load_lists
    from sculpt.emoji.pipeline import load_emoji_pipeline, oracle_dir
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.eval.classifiers import EmojiWorldClassifier
    from sculpt.eval.sampling import EMOJI_SAMPLER, Job, generate
    from sculpt.models.loading import model_hash
    from sculpt.emoji.dataset import class_prompt
    from sculpt.eval.evaluate import default_image_cache

    left_out = load_lists().get(args.list)
    names = load_taxonomy().names
    clf = EmojiWorldClassifier()
    acc = {}
    for label, pipe in (("original", load_emoji_pipeline()), ("oracle", load_emoji_pipeline(oracle_dir(args.list)))):
        h = model_hash(pipe)
        jobs = [Job(class_prompt(n), i) for n in names for i in range(args.n)]
        pred = clf.predict(generate(pipe, jobs, EMOJI_SAMPLER, h, cache=default_image_cache())).tolist()
        acc[label] = {n: sum(clf.labels[pred[k * args.n + i]] == n for i in range(args.n)) / args.n
                      for k, n in enumerate(names)}
    kept = [n for n in names if n not in left_out]
    mean = lambda xs: round(sum(xs := list(xs)) / len(xs), 4)  # noqa: E731
    row = {"list": args.list, "n": args.n,
           "left_out": {n: [acc["original"][n], acc["oracle"][n]] for n in left_out},
           "left_out_mean": [mean(acc["original"][n] for n in left_out), mean(acc["oracle"][n] for n in left_out)],
           "kept_mean": [mean(acc["original"][n] for n in kept), mean(acc["oracle"][n] for n in kept)],
           "kept_worst": {n: [acc["original"][n], acc["oracle"][n]] for n in
                          sorted(kept, key=lambda n: acc["oracle"][n] - acc["original"][n])[:5]}}
    print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
