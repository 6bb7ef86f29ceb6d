"""A quick look at one emoji-world setting of the paper's method: all ten targets, sequential.

    python benchmarks/emoji_sweep.py NAME '{"lambda_kd": 0.25}'   # method fields over the demo's

Erases the ten targets with `sculpt.emoji.demo.demo_spec` (the demo's data, anchors and method, the
JSON's fields replacing the method's), then classifies 16 images (seeds 0-15, DDIM 20 steps, guidance
4.0) of each target and of every fourth other class (13 classes), and appends one JSON line to
runs/sweep/results.jsonl: mean target accuracy ("total"), mean kept accuracy ("kept"; the base model
scores 0.95 on these), per-target accuracies, the kept classes under 0.85, erasure seconds.

Smaller and noisier than `sculpt demo --all` (16 images per prompt, a quarter of the kept classes);
it is how the demo's settings were chosen
(docs/results.md), and `sculpt demo --all` is the measurement that counts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    name, overrides = sys.argv[1], json.loads(sys.argv[2])

    from sculpt.emoji.classifier import load_classifier
    from sculpt.emoji.dataset import class_prompt
    from sculpt.emoji.demo import demo_spec
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.erase import erase
    from sculpt.eval.sampling import Job, SamplerSettings, generate
    from sculpt.models.loading import load_pipeline, model_hash

    tax, clf = load_taxonomy(), load_classifier()
    targets = list(tax.target_names)
    kept = [c.name for c in tax.classes if c.name not in tax.target_names][::4]
    out = Path("runs/sweep")
    t0 = time.time()
    pipe = load_pipeline("emoji")
    erase(demo_spec(targets, out / name, method=overrides), pipe=pipe, progress=False)
    erase_s = time.time() - t0
    mhash = model_hash(pipe)

    def accuracy(c: str, n: int = 16) -> float:
        images = generate(pipe, [Job(class_prompt(c), s) for s in range(n)], SamplerSettings(steps=20, guidance=4.0),
                          mhash)
        return (clf.predict(images).argmax(-1) == tax[c].id).float().mean().item()

    acc_t = {t: accuracy(t) for t in targets}
    acc_k = {c: accuracy(c) for c in kept}
    row = {"name": name, "method": overrides, "total": round(sum(acc_t.values()) / len(acc_t), 3),
           "kept": round(sum(acc_k.values()) / len(acc_k), 3), "targets": acc_t,
           "kept_under_0.85": {k: v for k, v in acc_k.items() if v < 0.85}, "erase_s": round(erase_s)}
    print(json.dumps(row))
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
