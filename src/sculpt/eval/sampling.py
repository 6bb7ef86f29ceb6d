"""Batched sampling with fixed seeds, cached on disk.

Every evaluated picture is a pure function of (model weights, prompt, seed, sampler settings): its
initial noise comes from its own generator seeded with `seed`, so the picture does not depend on
which other prompts share its batch, and the same seed gives the erased and the original model the
same starting noise (before/after grids compare like with like).

Pictures are stored as PNG under <cache>/<model hash[:16]>/<key[:2]>/<key>.png, where key hashes
(model hash, prompt, seed, sampler settings, scheduler, VAE weights). Freshly drawn pictures are quantised to 8 bits exactly
as they are stored, so a cached re-run returns the very same pixels. Each distinct prompt is encoded
once per call; batches mix prompts freely.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from sculpt.report.images import to_pil


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 25
    guidance: float = 4.0
    size: int | None = None  # pixels; None: the model's native size
    eta: float = 0.0  # DDIM eta; 0 is deterministic given the seed
    negative_prompt: str = ""

    def key_data(self, pipe) -> dict:
        """Everything besides the model hash (UNet + text encoder) that changes the pictures: these
        settings, the scheduler and its configuration, and the VAE's weights (which decode them)."""
        from sculpt.models.loading import hash_tensors

        scheduler = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
        return {**asdict(self), "scheduler": type(pipe.scheduler).__name__,
                "scheduler_config": json.loads(json.dumps(scheduler, sort_keys=True, default=str)),
                "vae": hash_tensors(pipe.vae.state_dict())}


@dataclass(frozen=True)
class Job:
    """One picture to draw: a prompt, its seed and (I2P-style prompt sets vary it) its guidance."""

    prompt: str
    seed: int
    guidance: float | None = None  # None: the settings' guidance


def image_key(model_hash: str, prompt: str, seed: int, sampler: dict) -> str:
    blob = json.dumps({"model": model_hash, "prompt": prompt, "seed": seed, "sampler": sampler}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ImageCache:
    """PNG files keyed by image_key(); safe to share between runs and processes (atomic writes)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, model_hash: str, key: str) -> Path:
        return self.root / model_hash[:16] / key[:2] / f"{key}.png"

    def get(self, model_hash: str, key: str) -> Image.Image | None:
        path = self.path(model_hash, key)
        if not path.is_file():
            return None
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError):  # a damaged file is redrawn, never trusted
            return None

    def put(self, model_hash: str, key: str, image: Image.Image) -> None:
        # Written beside, then renamed: a reader never sees half a file. No fsync (a cache entry lost
        # in a crash is only redrawn; get() refuses a damaged file).
        path = self.path(model_hash, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)


@torch.no_grad()
def generate(
    pipe,
    jobs: list[Job],
    settings: SamplerSettings,
    model_hash: str,
    cache: ImageCache | None = None,
    batch_size: int = 64,
) -> list[Image.Image]:
    """Pictures for `jobs`, in order: read from the cache, the missing ones drawn in batches."""
    sampler = settings.key_data(pipe)
    keys = [image_key(model_hash, j.prompt, j.seed, {**sampler, "guidance": _guidance(j, settings)}) for j in jobs]
    images: list[Image.Image | None] = [cache.get(model_hash, k) if cache else None for k in keys]
    missing = [i for i, im in enumerate(images) if im is None]
    # Group by guidance (one pipeline call has one guidance scale), keep the given order otherwise.
    by_guidance: dict[float, list[int]] = {}
    for i in missing:
        by_guidance.setdefault(_guidance(jobs[i], settings), []).append(i)
    embeds = _PromptEmbeddings(pipe)
    with _eval_mode(pipe):
        for guidance, indices in by_guidance.items():
            for start in range(0, len(indices), batch_size):
                batch = indices[start:start + batch_size]
                drawn = _sample(pipe, [jobs[i] for i in batch], settings, guidance, embeds)
                for i, image in zip(batch, drawn):
                    if cache:
                        cache.put(model_hash, keys[i], image)
                    images[i] = image
    return images  # type: ignore[return-value]


@contextmanager
def _eval_mode(pipe):
    """Dropout off while sampling (a freshly built module is in training mode: its text embeddings
    would change from call to call); each module's own mode is restored afterwards."""
    modules = [m for m in (pipe.text_encoder, pipe.unet, pipe.vae) if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _guidance(job: Job, settings: SamplerSettings) -> float:
    return float(settings.guidance if job.guidance is None else job.guidance)


class _PromptEmbeddings:
    """Text embeddings computed once per distinct prompt (the pipeline's own encode_prompt)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.known: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self.known]
        if new:
            embeds, _ = self.pipe.encode_prompt(new, self.pipe.device, 1, False)
            self.known.update(zip(new, embeds))
        return torch.stack([self.known[p] for p in prompts])


def _sample(pipe, jobs: list[Job], settings: SamplerSettings, guidance: float, embeds: _PromptEmbeddings) -> list[Image.Image]:
    prompt_embeds = embeds([j.prompt for j in jobs])
    negative = embeds([settings.negative_prompt] * len(jobs)) if guidance > 1 else None
    generators = [torch.Generator("cpu").manual_seed(j.seed) for j in jobs]
    size = settings.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    # Noise drawn on the CPU from each picture's own generator: the same on every device and batch.
    latents = torch.stack([
        torch.randn((pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor),
                    generator=g, dtype=torch.float32)
        for g in generators
    ]).to(pipe.device, prompt_embeds.dtype)
    out = pipe(
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, latents=latents,
        num_inference_steps=settings.steps, guidance_scale=guidance, eta=settings.eta,
        height=size, width=size, generator=generators if settings.eta else None, output_type="pt",
    ).images
    return to_pil(out)
