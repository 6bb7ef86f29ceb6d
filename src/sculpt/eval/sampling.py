"""Sampling for evaluation, training data and reports: one denoising loop, batched, cached on disk.

Every evaluated picture is a pure function of (model weights, prompt, seed, sampler settings): its
initial noise comes from its own generator seeded with `seed`, so the picture does not depend on
which other prompts share its batch, and the same seed gives the erased and the original model the
same starting noise (before/after grids compare like with like).

The loop (`denoise`) is the one of diffusers' StableDiffusionPipeline, written out so that nothing
but tensor work happens per step: prompt embeddings are computed once per distinct prompt, the
conditional and unconditional halves of classifier-free guidance go through the UNet as one batch,

    eps = eps(x_t; "") + w (eps(x_t; c) - eps(x_t; ""))          w: guidance scale
    x_{t-1} = scheduler step(eps, t, x_t)                        DDIM, DPM-Solver++(2M), ...

and pictures are decoded by the VAE once at the end. With the pipeline's own scheduler and full
precision it gives the pipeline's pictures (tests/test_sampling.py). `.steps`, `.scheduler`
("dpm++2m": DPM-Solver++ 2M, a higher-order solver of the same ODE) and `.precision` ("bf16": the
UNet under bfloat16 autocast) pick a faster path; benchmarks/sampler_fidelity.py measures what each
changes in the numbers (on the emoji world DDIM at 10 steps in bf16 passes, DPM-Solver++ narrowly
does not: docs/results.md).

Pictures are stored as PNG under <cache>/<model hash[:16]>/<key[:2]>/<key>.png, where key hashes
(model hash, prompt, seed, sampler settings, scheduler, VAE weights). Freshly drawn pictures are
quantised to 8 bits exactly as they are stored, so a cached re-run returns the very same pixels.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from sculpt.models.conditioning import conditioning
from sculpt.processes import ONE, Processes
from sculpt.progress import progress
from sculpt.report.images import to_pil

SCHEDULERS = ("pipeline", "ddim", "dpm++2m")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 25
    guidance: float = 4.0
    size: int | None = None  # pixels; None: the model's native size
    eta: float = 0.0  # DDIM eta; 0 is deterministic given the seed
    negative_prompt: str = ""
    scheduler: str = "pipeline"  # "pipeline": the model's own; "ddim"; "dpm++2m" (DPM-Solver++ 2M)
    precision: str = "fp32"  # "bf16": the UNet under bfloat16 autocast (latents and VAE stay fp32)

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown sampler scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown sampler precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.steps < 1:
            raise ValueError(f"sampler steps must be positive, got {self.steps}")

    def make_scheduler(self, pipe):
        """A fresh scheduler (its state is per call) with the pipeline's noise schedule."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        config = pipe.scheduler.config
        if self.scheduler == "ddim":
            return DDIMScheduler.from_config(config)
        if self.scheduler == "dpm++2m":
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
        return type(pipe.scheduler).from_config(config)

    def key_data(self, pipe) -> dict:
        """Everything besides the model hash (UNet + text encoder) that changes the pictures: these
        settings, the scheduler and its configuration, and the VAE's weights (which decode them)."""
        from sculpt.models.loading import hash_tensors

        sched = self.make_scheduler(pipe)
        config = {k: v for k, v in dict(sched.config).items() if not k.startswith("_")}
        return {**asdict(self), "scheduler": type(sched).__name__,
                "scheduler_config": json.loads(json.dumps(config, sort_keys=True, default=str)),
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


# -- the denoising loop ------------------------------------------------------------------------------


@torch.inference_mode()
def denoise(pipe, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
            settings: SamplerSettings, generator=None) -> torch.Tensor:
    """Pictures [B, 3, H, W] in [0, 1] from initial noise `latents` [B, C, h, w] and prompt embeddings
    `cond` (and `uncond` for guidance > 1), [B, L, D] each (SDXL: with the pooled row,
    sculpt.models.conditioning): the pipeline's loop, step by step."""
    scheduler = settings.make_scheduler(pipe)
    inputs = conditioning(pipe).unet_inputs
    device = pipe.unet.device
    scheduler.set_timesteps(settings.steps, device=device)
    step_kwargs = {}
    accepted = inspect.signature(scheduler.step).parameters
    if "eta" in accepted:
        step_kwargs["eta"] = settings.eta
    if "generator" in accepted:
        step_kwargs["generator"] = generator
    guided = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
    emb = torch.cat([uncond, cond]) if guided else cond
    x = latents.to(device, torch.float32) * scheduler.init_noise_sigma
    unet_dtype = pipe.unet.dtype
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if settings.precision == "bf16"
                else nullcontext())
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        with autocast:
            eps = pipe.unet(x_in.to(unet_dtype), t, **inputs(emb.to(unet_dtype), x_in), return_dict=False)[0]
        eps = eps.float()
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x, **step_kwargs, return_dict=False)[0]
    vae = pipe.vae
    images = vae.decode((x / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


class PromptEmbeddings:
    """Prompt embeddings computed once per distinct prompt (the pipeline's own encode_prompt, through
    sculpt.models.conditioning); `negative` gives the unconditional side of guidance as the pipeline
    makes it (SDXL: zeros for "")."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.conditioning = conditioning(pipe)
        self.known: dict[tuple[bool, str], torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self._get(prompts, negative=False)

    def negative(self, prompts: list[str]) -> torch.Tensor:
        return self._get(prompts, negative=True)

    def _get(self, prompts: list[str], negative: bool) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if (negative, p) not in self.known]
        if new:
            encode = self.conditioning.encode_negative if negative else self.conditioning.encode
            with torch.inference_mode():
                embeds = encode(self.pipe, new)
            self.known.update(((negative, p), e) for p, e in zip(new, embeds))
        return torch.stack([self.known[negative, p] for p in prompts])


def initial_noise(pipe, seeds: list[int], size: int) -> torch.Tensor:
    """One noise tensor per seed, drawn on the CPU from its own generator: the same on every device
    and in every batch."""
    shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def picture_size(pipe, settings: SamplerSettings) -> int:
    return settings.size or pipe.unet.config.sample_size * pipe.vae_scale_factor


def generate(
    pipe,
    jobs: list[Job],
    settings: SamplerSettings,
    model_hash: str,
    cache: ImageCache | None = None,
    batch_size: int = 64,
    desc: str | None = None,
    sampler_key: dict | None = None,
    processes: Processes = ONE,
) -> list[Image.Image]:
    """Pictures for `jobs`, in order: read from the cache, the missing ones drawn in batches.
    `desc` names the phase in the progress output (nothing is shown without it); `sampler_key` is
    settings.key_data(pipe) when the caller already has it (it hashes the VAE's weights).
    processes: the processes of a launch, all calling this with the same jobs: each draws its share
    of the batches (the batches of one process: the same pictures, sculpt.processes) and every one
    returns every picture."""
    sampler = sampler_key if sampler_key is not None else settings.key_data(pipe)
    keys = [image_key(model_hash, j.prompt, j.seed, {**sampler, "guidance": _guidance(j, settings)}) for j in jobs]
    images: list[Image.Image | None] = [cache.get(model_hash, k) if cache else None for k in keys]
    missing = [i for i, im in enumerate(images) if im is None]
    if processes.count > 1:  # what one of them lacks (a machine with its own disk) is drawn for all
        missing = sorted(set(processes.gather(missing)))
    # Group by guidance (one batch has one guidance scale), keep the given order otherwise.
    by_guidance: dict[float, list[int]] = {}
    for i in missing:
        by_guidance.setdefault(_guidance(jobs[i], settings), []).append(i)
    batches = [(guidance, indices[start:start + batch_size]) for guidance, indices in by_guidance.items()
               for start in range(0, len(indices), batch_size)]
    embeds = PromptEmbeddings(pipe)
    drawn = []  # (index, picture) of what this process drew
    with _eval_mode(pipe), progress(desc or "sampling", total=len(missing), unit="img", enabled=desc is not None) as bar:
        for b, (guidance, batch) in enumerate(batches):
            # Every process encodes every batch's prompts, as one process does; each draws its own batches.
            cond, uncond = _embeddings([jobs[i] for i in batch], settings, guidance, embeds)
            if not processes.draws(b):
                continue
            for i, image in zip(batch, _sample(pipe, [jobs[i] for i in batch], settings, guidance, cond, uncond)):
                if cache:
                    cache.put(model_hash, keys[i], image)
                drawn.append((i, image))
            bar.update(len(batch))
        if processes.count > 1:
            bar.update(len(missing) - len(drawn))
            drawn = processes.gather(drawn)
    for i, image in drawn:
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


def _embeddings(jobs: list[Job], settings: SamplerSettings, guidance: float, embeds: PromptEmbeddings):
    cond = embeds([j.prompt for j in jobs])
    uncond = embeds.negative([settings.negative_prompt] * len(jobs)) if guidance > 1 else None
    return cond, uncond


def _sample(pipe, jobs: list[Job], settings: SamplerSettings, guidance: float, cond, uncond) -> list[Image.Image]:
    latents = initial_noise(pipe, [j.seed for j in jobs], picture_size(pipe, settings))
    generators = [torch.Generator("cpu").manual_seed(j.seed) for j in jobs] if settings.eta else None
    return to_pil(denoise(pipe, latents, cond, uncond, guidance, settings, generator=generators))


# The emoji world's evaluation sampler: the pipeline's own DDIM at 10 steps with the UNet in bfloat16,
# instead of 25 steps in fp32 (3.0-3.6x the pictures per second). Chosen by benchmarks/sampler_fidelity.py
# (n=50 paired seeds, all 62 classes, rule in its docstring): per-class accuracy differs from DDIM-25
# by 0.011 on average (two independent seed sets of DDIM-25: 0.016); all-class accuracy 0.9742 against
# 0.9687, at the upper edge of DDIM-25's own 95% interval [0.9629, 0.9742] (fewer steps draw slightly
# cleaner pictures). Numbers: docs/results.md, docs/sampler_fidelity.json.
EMOJI_SAMPLER = SamplerSettings(steps=10, guidance=4.0, scheduler="pipeline", precision="bf16")


def default_sampler(model: str) -> SamplerSettings:
    """What evaluation, reports and `sculpt generate` sample with by default: the emoji world's measured
    fast path; for any other model its own scheduler, 25 steps, guidance 7.5 in full precision."""
    return EMOJI_SAMPLER if model == "emoji" else SamplerSettings(steps=25, guidance=7.5)
