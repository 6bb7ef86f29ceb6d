"""Speed, memory and patch size of the core method.

    python benchmarks/core_speed.py [--model tiny|emoji|PATH] [--steps-per-epoch 50] [--epochs 10]

Reports seconds per optimisation step and per stage (published schedule: 50 warm-up steps, then
10 epochs x 50 steps, batch 2), peak memory, and the patch size against a full UNet, for the
chosen model and, by counting parameters on the meta device (no weights needed), for UNets shaped
like SD 1.4 and SD 2.1.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch


def unet_sizes(config: dict) -> dict:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    from sculpt.models.loading import cross_attention_params

    total = sum(p.numel() for p in unet.parameters())
    attn2 = sum(p.numel() for p in cross_attention_params(unet).values())
    return {"unet_params": total, "patch_params": attn2, "unet_MB_fp32": round(total * 4 / 1e6, 1),
            "patch_MB_fp32": round(attn2 * 4 / 1e6, 1), "patch_share": round(attn2 / total, 4)}


SD14 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD21 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps-per-epoch", type=int, default=50)
    ap.add_argument("--n-images", type=int, default=8)
    args = ap.parse_args()

    from sculpt.config import RunConfig
    from sculpt.erase import erase
    from sculpt.models.loading import load_pipeline
    from sculpt.models.tiny import tiny_pipeline

    pipe = tiny_pipeline() if args.model == "tiny" else load_pipeline(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(
            model=args.model, output=f"{tmp}/run",
            method={"name": "sculpting", "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch},
            data={"n_images": args.n_images, "num_inference_steps": 10, "cache_dir": f"{tmp}/cache"},
            concepts=[{"name": "cat", "superclass": "animal"}, {"name": "car", "superclass": "vehicle"}],
        )
        t0 = time.perf_counter()
        result = erase(cfg, pipe=pipe, progress=False)
        wall = time.perf_counter() - t0
        patch_file = result.patch_path.stat().st_size
    steps = args.epochs * args.steps_per_epoch
    stage_s = [s["seconds"] for s in result.stages]
    unet_bytes = sum(t.numel() * t.element_size() for t in pipe.unet.state_dict().values())
    report = {
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "stage_seconds": stage_s,
        "seconds_per_step": round(sum(stage_s) / (len(stage_s) * (steps + cfg.method_config().warmup_steps)), 4),
        "wall_seconds_incl_data": round(wall, 1),
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "patch_file_MB": round(patch_file / 1e6, 3),
        "unet_MB": round(unet_bytes / 1e6, 3),
        "patch_share_of_unet": round(patch_file / unet_bytes, 4),
        "sd14_shaped": unet_sizes(SD14),
        "sd21_shaped": unet_sizes(SD21),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
