"""Self-generated training data, made once and cached on disk.

For each concept the model itself draws N images of the concept ("a photo of a tench") and N of
its superclass ("a photo of a fish", with the concept as negative prompt so the anchors do not
show it, unless the measured anchor rule of `anchors.py` finds that this removes the superclass).
Neighbour-aware methods also get images of the concepts to keep near it (`prepare_neighbour_data`).
Images are encoded to latents once and stored with the prompt embeddings, so the
training loop never runs the VAE or the text encoder.

Cache layout: <cache_dir>/<key>/data.safetensors and images/*.png, where key hashes everything
the data depends on (model weights, prompts, seeds, sampler settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sculpt.config import Concept, DataConfig, fill_template
from sculpt.data.anchors import MIN_ANCHORS, RULE, SUPERCLASS, AnchorJudge, needs_second_draw, shares
from sculpt.io import atomic_write
from sculpt.models.conditioning import conditioning
from sculpt.processes import ONE, Processes
from sculpt.progress import Progress

log = logging.getLogger("sculpt")


@dataclass
class ConceptData:
    """Everything a method needs about one concept, already on the training device's side."""

    concept: Concept
    latents: torch.Tensor  # [N, C, h, w] images of the concept, scaled VAE latents
    anchor_latents: torch.Tensor  # [M, C, h, w] images of the superclass (M <= 2N: the anchor rule filters)
    prompt_embeds: torch.Tensor  # [P, L, D] the concept's prompts (and synonyms)
    anchor_embeds: torch.Tensor  # [1, L, D] the superclass prompt
    key: str  # cache key: identifies this data for audit and resume
    image_dir: Path
    anchor: dict = field(default_factory=dict)  # the anchor rule's measurements and choice (for the ledger)

    @property
    def name(self) -> str:
        return self.concept.name


@dataclass
class NeighbourData:
    """Images of a concept to keep (a neighbour at risk) and its prompt, made by the model."""

    word: str
    latents: torch.Tensor  # [N, C, h, w]
    prompt_embeds: torch.Tensor  # [1, L, D]
    key: str


def stable_seed(seed: int, text: str) -> int:
    """A seed per concept that does not depend on the concept's place in the list."""
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Prompt embeddings exactly as the pipeline computes them at generation time, in the form the
    UNet reads them (sculpt.models.conditioning: [P, L, D]; SDXL: [P, L + 1, D] with the pooled row)."""
    return conditioning(pipe).encode(pipe, prompts).float().cpu()


@torch.no_grad()
def encode_unconditional(pipe, n: int = 1) -> torch.Tensor:
    """[n, ...] the unconditional embedding classifier-free guidance uses when there is no negative
    prompt: the encoded "" (SD), all zeros (SDXL base)."""
    return conditioning(pipe).encode_negative(pipe, [""] * n).float().cpu()


@torch.no_grad()
def encode_token_states(pipe, prompts: list[str]) -> torch.Tensor:
    """[P, L, D] the token states cross-attention's keys and values read (what closed-form edits of
    them work on): the prompt embeddings without SDXL's pooled row."""
    return conditioning(pipe).tokens(encode_prompts(pipe, prompts))


@torch.no_grad()
def encode_pictures(pipe, images) -> torch.Tensor:
    """Scaled VAE latents [N, C, h, w] of pictures: the mean of q(z|x), as the training data is encoded."""
    vae = pipe.vae
    import numpy as np

    x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)) for im in images])
    x = x.permute(0, 3, 1, 2) / 127.5 - 1  # [0, 255] -> [-1, 1], as the VAE was trained
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
    return (z * vae.config.scaling_factor).float()


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
    keep_images: list | None = None,
    processes: Processes = ONE,
) -> torch.Tensor:
    """Draw cfg.n_images images (prompts used in turn), save them as PNG, return their latents.

    Batch k's noise comes from one generator seeded seed + k * batch_size (as the pipeline draws it
    for a batch), and the denoising loop is sampling.denoise with the pipeline's own scheduler: the
    same pictures as `pipe(...)`, without its per-call overhead. With several processes each draws
    its share of the batches (sculpt.processes) and every process returns all the latents (and
    pictures), in batch order."""
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
    drawn = []  # (start, latents, pictures) of the batches this process draws
    for b, start in enumerate(range(0, cfg.n_images, cfg.batch_size)):
        n = min(cfg.batch_size, cfg.n_images - start)
        batch_prompts = [prompts[(start + j) % len(prompts)] for j in range(n)]
        # Every process encodes every batch's prompts, as one process does (the text encoder sees the
        # same calls), and draws only its own batches.
        uncond = embeds.negative([negative or ""] * n) if cfg.guidance_scale > 1 else None
        cond = embeds(batch_prompts)
        if not processes.draws(b):
            continue
        generator = torch.Generator(pipe.device).manual_seed(seed + start)
        noise = torch.randn((n, *shape), generator=generator, device=pipe.device, dtype=dtype)
        images = denoise(pipe, noise, cond, uncond, cfg.guidance_scale, settings)  # [n, 3, H, W] in [0, 1]
        pictures = []
        for j, img in enumerate(images):
            array = (img.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
            picture = Image.fromarray(array)
            picture.save(image_dir / f"{tag}_{start + j:04d}.png")
            pictures.append(picture)
        x = images.to(vae.device, vae.dtype) * 2 - 1
        # The mean of q(z|x): deterministic, and what the paper's "encode once" amounts to.
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        drawn.append((start, z.float().cpu(), pictures if keep_images is not None else []))
        if bar is not None:
            bar.update(n)
    if processes.count > 1:
        mine = sum(len(z) for _, z, _ in drawn)
        log.info("data %s: this process drew %d of %d pictures (%d processes)", tag, mine, cfg.n_images,
                 processes.count)
        drawn = sorted(processes.gather(drawn), key=lambda d: d[0])
        if bar is not None:
            bar.update(cfg.n_images - mine)
    if keep_images is not None:
        keep_images.extend(p for _, _, pictures in drawn for p in pictures)
    return torch.cat([z for _, z, _ in drawn])


def data_key(model_hash: str, concept: Concept, cfg: DataConfig, seed: int, size: int,
             judge: AnchorJudge | None = None) -> str:
    # The negative prompt as given, or the rule's inputs: the paper's candidate and who measures it.
    negative = (concept.negative_prompt if concept.negative_prompt is not None else
                {"rule": concept.superclass_negative(), "judge": judge.fingerprint if judge else "unmeasured",
                 "version": 2})  # 2: judged pictures, filtered
    spec = {
        "model": model_hash,
        "prompts": concept.concept_prompts(cfg.prompt_template),
        "anchor": concept.superclass_prompt(cfg.prompt_template),
        "negative": negative,
        "n": cfg.n_images,
        "steps": cfg.num_inference_steps,
        "guidance": cfg.guidance_scale,
        "size": size,
        "seed": seed,
        "batch": cfg.batch_size,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def prepare_concept_data(
    pipe, concept: Concept, cfg: DataConfig, seed: int, cache_dir: Path, model_hash: str, progress: bool = True,
    judge: AnchorJudge | None = None, processes: Processes = ONE,
) -> ConceptData:
    """Load the concept's data from the cache, or make it (generate, encode, save) once; making it
    shows a progress bar (one line when stderr is not a terminal). judge: measures the anchor images
    for the anchor rule (anchors.py) when the concept leaves its negative prompt to the rule.
    processes: the processes of a launch, which make missing data together (each draws its share of
    the batches); the main process writes the cache, the others keep the same tensors in memory."""
    size = image_size(pipe, cfg)
    key = data_key(model_hash, concept, cfg, seed, size, judge)
    folder = Path(cache_dir) / key
    file = folder / "data.safetensors"
    made = None
    if processes.any(not file.is_file()):  # missing for one process (a machine with its own disk): made by all
        prompts = concept.concept_prompts(cfg.prompt_template)
        anchor_prompt = concept.superclass_prompt(cfg.prompt_template)
        concept_seed = stable_seed(seed, concept.name)
        with Progress(f"data: {concept.name}", total=2 * cfg.n_images, unit="img", enabled=progress) as bar:
            latents = generate_latents(pipe, prompts, None, cfg, concept_seed, folder / "images", "concept", bar,
                                       processes=processes)
            anchor_latents, anchor = _anchor_latents(pipe, concept, anchor_prompt, cfg, concept_seed + 1_000_003,
                                                     folder / "images", bar, judge, processes)
        t = {"latents": latents, "anchor_latents": anchor_latents,
             "prompt_embeds": encode_prompts(pipe, prompts), "anchor_embeds": encode_prompts(pipe, [anchor_prompt])}
        meta = {"concept": concept.model_dump_json(), "key": key, "model_hash": model_hash,
                "anchor": json.dumps(anchor)}
        if processes.main:
            atomic_write(file, lambda tmp: save_file({k: v.contiguous() for k, v in t.items()}, tmp, metadata=meta))
        else:
            made = t, json.loads(meta["anchor"])
    if made is None:
        # Always train on what the cache holds, in fresh (aligned) memory: a first run and a resumed one
        # then compute on identical inputs, bit for bit.
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:  # tensors and the anchor record in one read
            t = {k: f.get_tensor(k).clone() for k in f.keys()}
            anchor = json.loads((f.metadata() or {}).get("anchor", "{}"))
    else:  # what the main process writes and trains on, in the layout it reads back (the VAE's latents
        # come out channels-last, and convolutions over another layout round differently)
        t, anchor = {k: v.clone(memory_format=torch.contiguous_format) for k, v in made[0].items()}, made[1]
    return ConceptData(
        concept=concept,
        latents=t["latents"],
        anchor_latents=t["anchor_latents"],
        prompt_embeds=t["prompt_embeds"],
        anchor_embeds=t["anchor_embeds"],
        key=key,
        image_dir=folder / "images",
        anchor=anchor,
    )


def _anchor_latents(pipe, concept: Concept, prompt: str, cfg: DataConfig, seed: int, image_dir: Path, bar,
                    judge: AnchorJudge | None, processes: Processes = ONE) -> tuple[torch.Tensor, dict]:
    """The superclass images: with the negative prompt the spec gives, else by the anchor rule
    (anchors.py): judged pictures, filtered. With several processes the main one judges the gathered
    pictures and sends its verdicts to the others: whether a second set is drawn is decided once."""
    if concept.negative_prompt is not None:
        z = generate_latents(pipe, [prompt], concept.negative_prompt, cfg, seed, image_dir, "anchor", bar,
                             processes=processes)
        return z, {"negative_prompt": concept.negative_prompt, "how": "given in the spec"}

    def judged(pictures):
        return processes.broadcast(judge(pictures, concept) if processes.main else None)

    pictures: list = []
    negative = concept.superclass_negative()
    z = generate_latents(pipe, [prompt], negative, cfg, seed, image_dir, "anchor", bar, pictures, processes)
    verdicts = judged(pictures) if judge is not None else None
    record = {"rule": RULE, "judge": judge.fingerprint if judge is not None else None, "negative_prompt": negative}
    if verdicts is None:
        record["how"] = "unmeasured (no judge for this superclass): the paper's pictures"
        return z, record
    record["with_negative"] = {**shares(verdicts), "verdicts": verdicts}
    kept = [z[i] for i, v in enumerate(verdicts) if v == SUPERCLASS]
    how = "measured: the negative prompt's pictures in the superclass and free of the concept"
    if needs_second_draw(verdicts):
        pictures = []
        z_plain = generate_latents(pipe, [prompt], "", cfg, seed, image_dir, "anchor_plain", None, pictures,
                                   processes)
        plain = judged(pictures)
        record["without_negative"] = {**shares(plain), "verdicts": plain}
        kept += [z_plain[i] for i, v in enumerate(plain) if v == SUPERCLASS]
        how = ("measured: the negative prompt leaves too few pictures in the superclass; those in it and free "
               "of the concept, with and without it")
    if len(kept) < MIN_ANCHORS:
        record.update(how=f"measured: fewer than {MIN_ANCHORS} pictures in the superclass: the paper's, unfiltered",
                      n_kept=len(z))
        return z, record
    record.update(how=how, n_kept=len(kept))
    return torch.stack(kept), record


def neighbour_key(model_hash: str, word: str, cfg: DataConfig, seed: int, size: int) -> str:
    spec = {"model": model_hash, "neighbour": fill_template(cfg.prompt_template, word), "n": cfg.neighbour_images,
            "steps": cfg.num_inference_steps, "guidance": cfg.guidance_scale, "size": size, "seed": seed,
            "batch": cfg.batch_size}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def prepare_neighbours(pipe, words: list[str], cfg: DataConfig, seed: int, cache_dir: Path, model_hash: str,
                       progress: bool = True, processes: Processes = ONE) -> dict[str, NeighbourData]:
    """cfg.neighbour_images images of each concept to keep ("a photo of a dog"), made once and cached
    like concept data (one progress line for all); the same word gives the same data whichever
    concept it is a neighbour of. Several processes make the missing ones together, as concept data."""
    size = image_size(pipe, cfg)
    keys = {w: neighbour_key(model_hash, w, cfg, seed, size) for w in dict.fromkeys(words)}
    files = {w: Path(cache_dir) / k / "data.safetensors" for w, k in keys.items()}
    missing_somewhere = set(processes.gather([w for w, f in files.items() if not f.is_file()]))
    missing = [w for w in files if w in missing_somewhere]
    made = {}
    if missing:
        one = cfg.model_copy(update={"n_images": cfg.neighbour_images})
        with Progress(f"data: {len(missing)} neighbours", total=len(missing) * cfg.neighbour_images, unit="img",
                      enabled=progress) as bar:
            for w in missing:
                prompt = fill_template(cfg.prompt_template, w)
                t = {"latents": generate_latents(pipe, [prompt], None, one, stable_seed(seed, "neighbour:" + w),
                                                 files[w].parent / "images", "neighbour", bar, processes=processes),
                     "prompt_embeds": encode_prompts(pipe, [prompt])}
                meta = {"neighbour": w, "key": keys[w], "model_hash": model_hash}
                if processes.main:
                    atomic_write(files[w], lambda tmp, t=t, meta=meta: save_file(
                        {k: v.contiguous() for k, v in t.items()}, tmp, metadata=meta))
                else:  # the main process writes these very tensors
                    made[w] = t
    out = {}
    for w, f in files.items():
        t = {k: v.clone(memory_format=torch.contiguous_format)  # as concept data: the layout of the file
             for k, v in (made[w] if w in made else load_file(str(f))).items()}
        out[w] = NeighbourData(w, t["latents"], t["prompt_embeds"], keys[w])
    return out
