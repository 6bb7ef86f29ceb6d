"""Seconds per optimisation step of the paper's method at the demo's settings, with the neighbour term.

    python benchmarks/step_seconds.py ['{"lambda_kd": 0}'] [--steps 40]

The demo's second stage (poodle, after tropical fish) on the committed emoji model, with the
neighbours the demo keeps for both (data from the cache, made on first use): one loss, backward and
Adam step of `Sculpting.losses`, repeated; the mean over the steps after a few warm-up steps. Issue 26
compares lambda_kd = 0 before and after the teacher stopped running on rows no term reads: run this
file on both versions side by side (the same machine, the same load) and compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", nargs="?", default="{}")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()

    from accelerate import Accelerator

    from sculpt.data.anchors import default_judge
    from sculpt.data.neighbours import default_siblings, default_vocabulary, run_neighbours
    from sculpt.data.prepare import encode_prompts, prepare_concept_data, prepare_neighbours
    from sculpt.emoji.demo import demo_spec
    from sculpt.methods.sculpting import Sculpting
    from sculpt.models.loading import cross_attention_params, load_pipeline, model_hash
    from sculpt.paths import default_cache_dir
    from sculpt.stage import StageContext

    pipe = load_pipeline("emoji")
    cfg = demo_spec(["tropical fish", "poodle"], "/tmp/unused", method=json.loads(args.method))
    h, cache = model_hash(pipe), default_cache_dir() / "data"
    data = [prepare_concept_data(pipe, c, cfg.data, cfg.seed, cache, h, judge=default_judge("emoji"))
            for c in cfg.concepts]
    method = Sculpting(cfg.method_config())
    near = run_neighbours(pipe, cfg.concepts, cfg.concepts, method.config.neighbours, default_vocabulary("emoji"),
                          cfg.data.prompt_template, default_siblings("emoji"))
    words = list(dict.fromkeys(w for ws in near.values() for w, _ in ws))
    neighbours = prepare_neighbours(pipe, words, cfg.data, cfg.seed, cache, h, progress=False)
    ctx = StageContext(pipe=pipe, accelerator=Accelerator(cpu=True), index=1, concepts=[data[1]],
                       previous=[data[0]], seed=1, empty_embeds=encode_prompts(pipe, [""]),
                       neighbours=list(neighbours.values()))
    params = cross_attention_params(pipe.unet)
    teacher = {n: p.detach().clone() for n, p in params.items()}
    model, optimizer, _ = ctx.prepare_training(params, method.config.lr, args.steps)
    stamps = []
    for _ in range(args.steps):
        terms = method.losses(ctx, model, teacher)
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    skip = 5
    print(json.dumps({"method": json.loads(args.method), "neighbours": len(words), "steps_timed": len(stamps) - 1 - skip,
                      "s_per_step": round((stamps[-1] - stamps[skip]) / (len(stamps) - 1 - skip), 4),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
