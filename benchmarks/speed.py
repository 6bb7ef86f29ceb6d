"""Where the time of the main loop goes, measured side by side in one run on this machine.

    python benchmarks/speed.py [--images 256] [--steps 60] [--parts sampling,step,memory] [--out FILE]

1. sampling: pictures per second of evaluation sampling on the committed emoji model, for
   - "pipeline b16": a plain StableDiffusionPipeline call, 16 pictures per call (the reference),
   - "before": what evaluation did until now (the pipeline at batch 64, its DDIM, 25 steps, fp32),
   - "loop, same sampler": sculpt.eval.sampling.generate with those settings (the same pictures),
   - "loop, emoji default": generate with EMOJI_SAMPLER, the evaluation's default now;
   the same prompts and seeds, no picture cache, each measured twice in alternation (best of two).
2. step: seconds per optimisation step of the paper's method at the emoji demo's settings (a second
   stage: concept, superclass and earlier-concept batches), against the bare cost of the UNet passes
   one step makes (a forward with gradients on the 3B samples, its backward into the cross-attention
   weights, the no-grad target forward on B and the teacher forward on 2B), i.e. the physical limit
   of a step; the ratio is limit / step.
3. memory: peak resident memory of one optimisation step of the method (its three UNet calls, the
   backward, an Adam step over what has gradients) on a randomly initialised UNet shaped like SD
   1.4's (64x64 latents, batch 1, 77x768 text states), each in a fresh process: gradients on the
   cross-attention projections only (as implemented here) vs gradients on every UNet parameter (the
   authors' script sets requires_grad everywhere and masks afterwards); reported above the memory
   of the loaded model, after the backward and after the optimiser step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


# -- 1. sampling -------------------------------------------------------------------------------------


def sampling_speeds(n_images: int) -> dict:
    from sculpt.emoji.dataset import class_prompt
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.eval.sampling import EMOJI_SAMPLER, Job, PromptEmbeddings, SamplerSettings, generate, initial_noise
    from sculpt.models.loading import load_pipeline, model_hash

    pipe = load_pipeline("emoji")
    pipe.set_progress_bar_config(disable=True)
    names = load_taxonomy().names
    jobs = [Job(class_prompt(names[i % len(names)]), i) for i in range(n_images)]
    mhash = model_hash(pipe)
    same = SamplerSettings(steps=25, guidance=4.0)

    def pipeline_call(batch: int):
        embeds = PromptEmbeddings(pipe)
        for start in range(0, len(jobs), batch):
            part = jobs[start:start + batch]
            latents = initial_noise(pipe, [j.seed for j in part], 32)
            pipe(prompt_embeds=embeds([j.prompt for j in part]), negative_prompt_embeds=embeds([""] * len(part)),
                 latents=latents, num_inference_steps=25, guidance_scale=4.0, output_type="pil")

    paths = {
        "pipeline b16 (reference)": lambda: pipeline_call(16),
        "before (pipeline b64, ddim 25, fp32)": lambda: pipeline_call(64),
        "loop, same sampler (ddim 25, fp32)": lambda: generate(pipe, jobs, same, mhash, None, batch_size=64),
        f"loop, emoji default ({EMOJI_SAMPLER.scheduler} {EMOJI_SAMPLER.steps}, {EMOJI_SAMPLER.precision})":
            lambda: generate(pipe, jobs, EMOJI_SAMPLER, mhash, None, batch_size=64),
    }
    best = {k: float("inf") for k in paths}
    for _ in range(2):
        for label, fn in paths.items():
            t = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - t)
    ref, before = list(best)[0], list(best)[1]
    return {label: {"images_per_s": round(n_images / s, 2), "vs_reference": round(best[ref] / s, 2),
                    "vs_before": round(best[before] / s, 2)} for label, s in best.items()}


# -- 2. one optimisation step ------------------------------------------------------------------------


def emoji_stage_context(method_cfg: dict):
    """The demo's second stage (poodle after tropical fish) on the committed model, data from the cache."""
    from sculpt.config import RunConfig
    from sculpt.data.prepare import encode_prompts, prepare_concept_data
    from sculpt.emoji.demo import demo_spec
    from sculpt.erase import make_accelerator
    from sculpt.models.loading import load_pipeline, model_hash
    from sculpt.paths import default_cache_dir
    from sculpt.stage import StageContext

    pipe = load_pipeline("emoji")
    cfg: RunConfig = demo_spec(["tropical fish", "poodle"], "/tmp/unused", method=method_cfg)
    h = model_hash(pipe)
    from sculpt.data.anchors import default_judge

    judge = default_judge(cfg.model)
    data = [prepare_concept_data(pipe, c, cfg.data, cfg.seed, default_cache_dir() / "data", h, judge=judge)
            for c in cfg.concepts]
    ctx = StageContext(pipe=pipe, accelerator=make_accelerator(cfg), index=1, concepts=[data[1]], previous=[data[0]],
                       seed=1, empty_embeds=encode_prompts(pipe, [""]))
    return ctx, cfg


def step_speed(steps: int) -> dict:
    from sculpt.emoji.demo import EMOJI_METHOD
    from sculpt.methods.sculpting import Sculpting

    # One epoch of `steps` steps after a short warm-up; mask updates as in the demo (every 40 steps).
    ctx, cfg = emoji_stage_context({"epochs": 1, "steps_per_epoch": steps, "warmup_steps": 5})
    method = Sculpting(cfg.method_config())
    stamps: list[float] = []
    ctx.on_step = lambda record: stamps.append(time.perf_counter())
    method.fit_stage(ctx)
    skip = 5  # the first steps warm caches and allocators up
    method_s = (stamps[-1] - stamps[skip]) / (len(stamps) - 1 - skip)

    # The bare passes of one step, same shapes, same trainable tensors, nothing else.
    B = EMOJI_METHOD["batch_size"]
    unet = ctx.unet
    params = method.trainable_parameters(unet)
    unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    unet.train()
    d = ctx.concepts[0]
    x = torch.randn(3 * B, *d.latents.shape[1:])
    emb = d.prompt_embeds[:1].expand(3 * B, -1, -1).contiguous()
    t = torch.randint(0, 1000, (3 * B,))
    teacher = {n: p.detach().clone() for n, p in params.items()}

    def bare():
        out = unet(x, t, encoder_hidden_states=emb).sample
        with torch.no_grad():
            unet(x[:B], t[:B], encoder_hidden_states=emb[:B])
            torch.func.functional_call(unet, teacher, (x[B:], t[B:]), {"encoder_hidden_states": emb[B:]})
        out.square().mean().backward()
        for p in params.values():
            p.grad = None

    for _ in range(3):
        bare()
    n = max(steps // 2, 10)
    tb = time.perf_counter()
    for _ in range(n):
        bare()
    bare_s = (time.perf_counter() - tb) / n
    unet.requires_grad_(False)
    return {"method_s_per_step": round(method_s, 4), "bare_unet_s_per_step": round(bare_s, 4),
            "ratio_limit_over_step": round(bare_s / method_s, 3), "batch_per_kind": B,
            "steps_timed": len(stamps) - 1 - skip}


# -- 3. memory of one step at SD 1.4's shape ---------------------------------------------------------


def _memory_child(mode: str) -> dict:
    """One step of the method's loss on a random SD 1.4-shaped UNet; peak RSS of this process."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from sculpt.methods.sculpting import Sculpting, SculptingConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    method = Sculpting(SculptingConfig(batch_size=1))

    class Ctx:  # the StageContext surface the loss reads, with random data in SD's shapes
        previous = [None]

        def __init__(self):
            self.noise_scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
            self.g = torch.Generator().manual_seed(0)

        def per_process(self, n):
            return n

        def concept_batch(self, n, data=None, replace=True):
            return torch.randn(n, 4, 64, 64, generator=self.g), torch.randn(n, 77, 768), torch.randn(n, 77, 768)

        def anchor_batch(self, n, data=None, replace=True):
            return torch.randn(n, 4, 64, 64, generator=self.g), torch.randn(n, 77, 768)

        def timesteps(self, n):
            return torch.randint(0, 1000, (n,), generator=self.g)

        def noise_like(self, x):
            return torch.randn(x.shape, generator=self.g)

        def add_noise(self, x0, noise, t):
            return self.noise_scheduler.add_noise(x0, noise, t)

        def target(self, x0, noise, t):
            return noise

        def predict(self, model, x_t, t, emb):
            return model(x_t, t, encoder_hidden_states=emb).sample.float()

        def predict_with(self, weights, x_t, t, emb):
            with torch.no_grad():
                return torch.func.functional_call(unet, weights, (x_t, t), {"encoder_hidden_states": emb}).sample.float()

    params = method.trainable_parameters(unet)
    if mode == "all-parameters":
        unet.requires_grad_(True)  # the authors' script: gradients everywhere, masked afterwards
    else:
        unet.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
    teacher = {n: p.detach().clone() for n, p in params.items()}
    # Adam over what has gradients (its two moments per entry are allocated at the first step).
    optimizer = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=3e-6)
    t = time.perf_counter()
    terms = method.losses(Ctx(), unet, teacher)
    terms["loss"].backward()
    after_backward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    optimizer.step()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grads = sum(p.grad.numel() for p in unet.parameters() if p.grad is not None)
    return {"mode": mode, "peak_rss_mb": round(peak), "after_model_mb": round(after_load),
            "forward_backward_mb": round(after_backward - after_load), "step_mb": round(peak - after_load),
            "parameters_with_grad": grads, "seconds": round(seconds, 1)}


def memory() -> dict:
    out = {}
    for mode in ("cross-attention", "all-parameters"):
        r = subprocess.run([sys.executable, __file__, "--memory-child", mode], capture_output=True, text=True,
                           env={**os.environ, "SCULPT_PROGRESS": "off"})
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    out["step_memory_ratio_all_over_attn2"] = round(out["all-parameters"]["step_mb"] / out["cross-attention"]["step_mb"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256, help="pictures per sampling path")
    ap.add_argument("--steps", type=int, default=60, help="optimisation steps timed")
    ap.add_argument("--parts", default="sampling,step,memory")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(_memory_child(args.memory_child)))
        return
    report = {"torch_threads": torch.get_num_threads(), "load_avg_at_start": os.getloadavg()}
    parts = args.parts.split(",")
    if "sampling" in parts:
        report["sampling"] = sampling_speeds(args.images)
        print(json.dumps({"sampling": report["sampling"]}, indent=2), flush=True)
    if "step" in parts:
        report["step"] = step_speed(args.steps)
        print(json.dumps({"step": report["step"]}, indent=2), flush=True)
    if "memory" in parts:
        report["memory"] = memory()
        print(json.dumps({"memory": report["memory"]}, indent=2), flush=True)
    report["load_avg_at_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
