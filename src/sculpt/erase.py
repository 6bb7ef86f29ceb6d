"""The shared erasure loop: load the model, make the data, run the method stage by stage, save
patches. Every method (the paper's and the baselines) runs through here.

Output folder:
    config.yaml            the resolved spec
    erase.log              human-readable log
    metrics.jsonl          one line per optimisation step (loss terms, mask density, turnover)
    stages/NN-<concept>.safetensors   cumulative patch after stage NN
    patch.safetensors      the final patch (== the last stage's)
    summary.json           per-stage summary: timings, best epoch, hashes
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from sculpt.config import RunConfig
from sculpt.data.prepare import ConceptData, encode_prompts, prepare_concept_data
from sculpt.io import atomic_write_text
from sculpt.methods import get_method
from sculpt.models.loading import load_pipeline, model_hash, resolve_device
from sculpt.patch import Patch, apply_patches, make_patch, save_patch, versions
from sculpt.stage import StageContext

log = logging.getLogger("sculpt")


@dataclass
class EraseResult:
    output: Path
    patch_path: Path
    patch: Patch
    stages: list[dict[str, Any]]
    pipe: Any


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "concept"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SCULPT_CACHE", Path.home() / ".cache" / "sculpt"))


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    device = resolve_device(cfg.train.device)
    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=device.type == "cpu")


def _file_logger(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def erase(cfg: RunConfig, pipe=None, progress: bool = True) -> EraseResult:
    """Run the spec: forget cfg.concepts stage by stage with cfg.method; return the final patch."""
    out = Path(cfg.output or "runs/erase")
    (out / "stages").mkdir(parents=True, exist_ok=True)
    handler = _file_logger(out / "erase.log")
    try:
        return _erase(cfg, out, pipe, progress)
    finally:
        log.removeHandler(handler)
        handler.close()


def _erase(cfg: RunConfig, out: Path, pipe, progress: bool) -> EraseResult:
    accelerator = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    if pipe is None:
        pipe = load_pipeline(cfg.model, device=accelerator.device)
    else:
        pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    if cfg.patches:
        apply_patches(pipe, cfg.patches)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    metrics_file = out / "metrics.jsonl"
    metrics_file.write_text("")

    base_hash = model_hash(pipe)
    method = get_method(cfg.method_name)(cfg.method_config())
    trainable = method.trainable_parameters(pipe.unet)
    base = {n: p.detach().to("cpu").clone() for n, p in trainable.items()}
    log.info("model %s (hash %s), method %s, %d concepts, mode %s",
             cfg.model, base_hash[:16], method.name, len(cfg.concepts), cfg.mode)

    # Data for every concept, made once (the main process generates, the others read the cache).
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir() / "data"
    t0 = time.perf_counter()
    data: dict[str, ConceptData] = {}
    with accelerator.main_process_first():
        for c in cfg.concepts:
            data[c.name] = prepare_concept_data(pipe, c, cfg.data, cfg.seed, cache, base_hash)
    empty = encode_prompts(pipe, [""])
    log.info("data ready in %.1fs (cache %s)", time.perf_counter() - t0, cache)

    summaries, done, patch, patch_path = [], [], None, out / "patch.safetensors"
    for i, concepts in enumerate(cfg.stages()):
        names = [c.name for c in concepts]
        bar = _progress_bar(progress and accelerator.is_main_process, i, names, method)
        ctx = StageContext(
            pipe=pipe, accelerator=accelerator, index=i,
            concepts=[data[n] for n in names], previous=[data[n] for n in done],
            seed=cfg.seed + 1000 * i, log_file=metrics_file, empty_embeds=empty,
            on_step=bar.update_record if bar else None,
        )
        t_stage = time.perf_counter()
        summary = method.fit_stage(ctx)
        seconds = time.perf_counter() - t_stage
        if bar:
            bar.close()
        done += names
        patch = make_patch(pipe.unet, base, {
            "base_model": cfg.model, "base_hash": base_hash, "result_hash": model_hash(pipe),
            "method": method.name, "method_config": method.config.model_dump(mode="json"),
            "concepts": done, "superclasses": {c.name: c.superclass for c in cfg.concepts if c.name in done},
            "mode": cfg.mode, "seed": cfg.seed, "data": cfg.data.model_dump(mode="json"),
            "data_keys": {n: data[n].key for n in done}, "stage": i + 1, "versions": versions(),
        })
        stage_path = out / "stages" / f"{i + 1:02d}-{slug('+'.join(names))}.safetensors"
        if accelerator.is_main_process:
            save_patch(patch, stage_path)
        summaries.append({"stage": i + 1, "concepts": names, "seconds": round(seconds, 3),
                          "patch": str(stage_path), **summary})
        log.info("stage %d %s done in %.1fs: %s", i + 1, names, seconds, summary)

    if accelerator.is_main_process:
        save_patch(patch, patch_path)
        atomic_write_text(out / "summary.json", json.dumps(
            {"base_model": cfg.model, "base_hash": base_hash, "method": method.name,
             "stages": summaries, "patch": str(patch_path), "patch_bytes": patch.nbytes()}, indent=2))
    return EraseResult(out, patch_path, patch, summaries, pipe)


class _Bar:
    """tqdm bar per stage showing the loss terms, mask density and turnover."""

    def __init__(self, tqdm_bar):
        self.bar = tqdm_bar

    def update_record(self, record: dict[str, Any]) -> None:
        shown = {k: record[k] for k in ("L_f", "L_a", "L_kd", "loss", "density", "turnover") if k in record}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _progress_bar(enabled: bool, index: int, names: list[str], method) -> _Bar | None:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = method.steps_per_stage()
    return _Bar(tqdm(total=total or None, desc=f"stage {index + 1}: {', '.join(names)}", leave=True))
