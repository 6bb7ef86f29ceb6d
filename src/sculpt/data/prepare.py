"""Self-generated training data, made once and cached on disk.

For each concept the model itself draws N images of the concept ("a photo of a tench") and N of
its superclass ("a photo of a fish", with the concept as negative prompt so the anchors do not
show it). Images are encoded to latents once and stored with the prompt embeddings, so the
training loop never runs the VAE or the text encoder.

Cache layout: <cache_dir>/<key>/data.safetensors and images/*.png, where key hashes everything
the data depends on (model weights, prompts, seeds, sampler settings).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sculpt.config import Concept, DataConfig
from sculpt.io import atomic_write
from sculpt.progress import Progress


@dataclass
class ConceptData:
    """Everything a method needs about one concept, already on the training device's side."""

    concept: Concept
    latents: torch.Tensor  # [N, C, h, w] images of the concept, scaled VAE latents
    anchor_latents: torch.Tensor  # [N, C, h, w] images of the superclass
    prompt_embeds: torch.Tensor  # [P, L, D] the concept's prompts (and synonyms)
    anchor_embeds: torch.Tensor  # [1, L, D] the superclass prompt
    key: str  # cache key: identifies this data for audit and resume
    image_dir: Path

    @property
    def name(self) -> str:
        return self.concept.name


def stable_seed(seed: int, text: str) -> int:
    """A seed per concept that does not depend on the concept's place in the list."""
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text embeddings exactly as the pipeline computes them at generation time."""
    embeds, _ = pipe.encode_prompt(prompts, pipe.device, 1, False)
    return embeds.float().cpu()


def image_size(pipe, cfg: DataConfig) -> int:
    return cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor


def check_image_size(pipe, size: int) -> None:
    # The UNet halves the latent at every down block; diffusers' SD pipelines also ask for multiples of 8.
    multiple = math.lcm(8, pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1))
    if size <= 0 or size % multiple:
        raise ValueError(f"image size {size} is not a positive multiple of {multiple}, which this model needs")


@torch.no_grad()
def generate_latents(
    pipe,
    prompts: list[str],
    negative: str | None,
    cfg: DataConfig,
    seed: int,
    image_dir: Path,
    tag: str,
    bar=None,
) -> torch.Tensor:
    """Draw cfg.n_images images (prompts used in turn), save them as PNG, return their latents.

    Batch k's noise comes from one generator seeded seed + k * batch_size (as the pipeline draws it
    for a batch), and the denoising loop is sampling.denoise with the pipeline's own scheduler: the
    same pictures as `pipe(...)`, without its per-call overhead."""
    from PIL import Image

    from sculpt.eval.sampling import PromptEmbeddings, SamplerSettings, denoise

    size = image_size(pipe, cfg)
    check_image_size(pipe, size)
    image_dir.mkdir(parents=True, exist_ok=True)
    vae = pipe.vae
    settings = SamplerSettings(steps=cfg.num_inference_steps, guidance=cfg.guidance_scale, size=size)
    embeds = PromptEmbeddings(pipe)
    shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.unet.dtype  # as the pipeline draws it
    latents = []
    for start in range(0, cfg.n_images, cfg.batch_size):
        n = min(cfg.batch_size, cfg.n_images - start)
        batch_prompts = [prompts[(start + j) % len(prompts)] for j in range(n)]
        generator = torch.Generator(pipe.device).manual_seed(seed + start)
        noise = torch.randn((n, *shape), generator=generator, device=pipe.device, dtype=dtype)
        uncond = embeds([negative or ""] * n) if cfg.guidance_scale > 1 else None
        images = denoise(pipe, noise, embeds(batch_prompts), uncond, cfg.guidance_scale, settings)  # [n, 3, H, W] in [0, 1]
        for j, img in enumerate(images):
            array = (img.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
            Image.fromarray(array).save(image_dir / f"{tag}_{start + j:04d}.png")
        x = images.to(vae.device, vae.dtype) * 2 - 1
        # The mean of q(z|x): deterministic, and what the paper's "encode once" amounts to.
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        latents.append(z.float().cpu())
        if bar is not None:
            bar.update(n)
    return torch.cat(latents)


def data_key(model_hash: str, concept: Concept, cfg: DataConfig, seed: int, size: int) -> str:
    spec = {
        "model": model_hash,
        "prompts": concept.concept_prompts(cfg.prompt_template),
        "anchor": concept.superclass_prompt(cfg.prompt_template),
        "negative": concept.superclass_negative(),
        "n": cfg.n_images,
        "steps": cfg.num_inference_steps,
        "guidance": cfg.guidance_scale,
        "size": size,
        "seed": seed,
        "batch": cfg.batch_size,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def prepare_concept_data(
    pipe, concept: Concept, cfg: DataConfig, seed: int, cache_dir: Path, model_hash: str, progress: bool = True
) -> ConceptData:
    """Load the concept's data from the cache, or make it (generate, encode, save) once; making it
    shows a progress bar (one line when stderr is not a terminal)."""
    size = image_size(pipe, cfg)
    key = data_key(model_hash, concept, cfg, seed, size)
    folder = Path(cache_dir) / key
    file = folder / "data.safetensors"
    if not file.is_file():
        prompts = concept.concept_prompts(cfg.prompt_template)
        anchor = concept.superclass_prompt(cfg.prompt_template)
        concept_seed = stable_seed(seed, concept.name)
        with Progress(f"data: {concept.name}", total=2 * cfg.n_images, unit="img", enabled=progress) as bar:
            t = {
                "latents": generate_latents(pipe, prompts, None, cfg, concept_seed, folder / "images", "concept", bar),
                "anchor_latents": generate_latents(
                    pipe, [anchor], concept.superclass_negative(), cfg, concept_seed + 1_000_003,
                    folder / "images", "anchor", bar,
                ),
                "prompt_embeds": encode_prompts(pipe, prompts),
                "anchor_embeds": encode_prompts(pipe, [anchor]),
            }
        meta = {"concept": concept.model_dump_json(), "key": key, "model_hash": model_hash}
        atomic_write(file, lambda tmp: save_file({k: v.contiguous() for k, v in t.items()}, tmp, metadata=meta))
    # Always train on what the cache holds, in fresh (aligned) memory: a first run and a resumed one
    # then compute on identical inputs, bit for bit.
    t = {k: v.clone() for k, v in load_file(str(file)).items()}
    return ConceptData(
        concept=concept,
        latents=t["latents"],
        anchor_latents=t["anchor_latents"],
        prompt_embeds=t["prompt_embeds"],
        anchor_embeds=t["anchor_embeds"],
        key=key,
        image_dir=folder / "images",
    )
