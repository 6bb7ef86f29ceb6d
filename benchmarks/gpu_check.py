"""The emoji demo's erasure on a CUDA machine, in fp32 and in bf16, against the CPU result.

    python benchmarks/gpu_check.py [--targets "tropical fish" poodle] [--n 16] [--out gpu_check.json]

For each precision: erase the targets with the demo's spec (sculpt.emoji.demo.demo_spec) on the GPU,
time each optimisation step (the stage's metrics.jsonl is written per step; seconds per step are
taken from the stage wall time / steps), read the peak GPU memory, then evaluate the patch on the
CPU with the demo's evaluation (n pictures per class prompt, the emoji sampler) so the numbers are
comparable with a CPU run of the same spec, which the script also makes (skipped with --no-cpu).
Prints and writes one JSON record per device/precision: seconds per step, peak memory, Total Acc,
kept accuracy. Needs a CUDA device; exits with a clear message otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def erase_and_measure(targets: list[str], out: Path, device: str, precision: str, n: int) -> dict:
    from sculpt.emoji.demo import demo_spec
    from sculpt.erase import erase
    from sculpt.eval.evaluate import EvalSettings, evaluate
    from sculpt.models.loading import load_pipeline

    cfg = demo_spec(targets, out)
    cfg.train.device = device
    cfg.train.mixed_precision = precision
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = erase(cfg, progress=False)
    wall = time.perf_counter() - t
    steps = sum(s["steps"] for s in result.stages)
    stage_s = sum(s["seconds"] for s in result.stages)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    settings = EvalSettings(n=n, n_paraphrase=4, quality=False, unsafe=False).for_model("emoji")
    m = evaluate(model="emoji", pipe=load_pipeline("emoji"), run=out, settings=settings, progress=False)
    return {"device": device, "precision": precision, "steps": steps, "seconds_per_step": round(stage_s / steps, 4),
            "erase_wall_s": round(wall, 1), "peak_gpu_mb": round(peak, 1) if peak is not None else None,
            "total_acc": m["forgetting"]["total_acc"], "kept_acc": m["preservation"]["acc"],
            "per_concept": m["forgetting"]["per_concept"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", nargs="+", default=["tropical fish", "poodle", "church"])
    ap.add_argument("--n", type=int, default=16, help="pictures per class prompt in the evaluation")
    ap.add_argument("--runs", default="runs/gpu_check")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU reference run")
    ap.add_argument("--out", help="also write the records here (JSON)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a GPU machine (the CPU numbers are in docs/results.md)")
    records = []
    plan = [("cuda", "no"), ("cuda", "bf16")] + ([] if args.no_cpu else [("cpu", "no")])
    for device, precision in plan:
        rec = erase_and_measure(args.targets, Path(args.runs) / f"{device}-{precision}", device, precision, args.n)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
