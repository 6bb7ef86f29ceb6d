"""Loading Stable-Diffusion-shaped pipelines and fingerprinting their weights.

Anything with a `UNet2DConditionModel` (cross-attention), a text encoder + tokenizer, a VAE and a
noise scheduler works: SD 1.x, SD 2.x, and the bundled emoji world. Nothing here assumes SD 1.4's
sizes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

EMOJI = "emoji"


class ModelLoadError(ValueError):
    """The model argument does not name a usable diffusion pipeline."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


def load_pipeline(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a text-to-image pipeline from 'emoji', a local diffusers folder, a Hub id or a single
    `.safetensors`/`.ckpt` checkpoint. The safety checker is never loaded (it is not part of the
    model being edited)."""
    from diffusers import StableDiffusionPipeline

    device = torch.device(device) if isinstance(device, str) else device
    if model == EMOJI:
        from sculpt.emoji.pipeline import load_emoji_pipeline

        pipe = load_emoji_pipeline(device=device, dtype=dtype)
    else:
        path = Path(model)
        kwargs = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        try:
            if path.is_file() and path.suffix in {".safetensors", ".ckpt"}:
                if path.suffix == ".ckpt":
                    raise ModelLoadError(
                        f"{model}: .ckpt files are pickles and are not loaded; convert it to .safetensors"
                    )
                pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
            elif path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ModelLoadError(
                        f"{model}: not a diffusers pipeline folder (no model_index.json in it)"
                    )
                pipe = StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
            elif path.exists():
                raise ModelLoadError(f"{model}: expected a diffusers folder or a .safetensors checkpoint")
            else:
                pipe = StableDiffusionPipeline.from_pretrained(model, **kwargs)  # a Hub id
        except ModelLoadError:
            raise
        except (OSError, ValueError, EnvironmentError) as exc:
            raise ModelLoadError(f"{model}: could not load a diffusion pipeline: {exc}") from exc
        pipe = pipe.to(device)
    check_pipeline(pipe, model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_pipeline(pipe, name: str = "model") -> None:
    """The method edits cross-attention: refuse a pipeline without it, with a clear message."""
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise ModelLoadError(f"{name}: the pipeline has no {part}")
    if not cross_attention_params(pipe.unet):
        raise ModelLoadError(f"{name}: the UNet has no cross-attention (attn2) layers to edit")


# -- which tensors the method trains -----------------------------------------------------------

CROSS_ATTENTION_WEIGHTS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
CROSS_ATTENTION_BIASES = ("to_out.0.bias",)


def cross_attention_params(unet: nn.Module, biases: bool = True) -> dict[str, nn.Parameter]:
    """The cross-attention projections (diffusers names containing `attn2`): q, k, v, out weights,
    and the output bias (trained densely, never masked)."""
    suffixes = CROSS_ATTENTION_WEIGHTS + (CROSS_ATTENTION_BIASES if biases else ())
    return {
        n: p for n, p in unet.named_parameters() if ".attn2." in n and n.endswith(suffixes)
    }


def non_cross_attention_params(unet: nn.Module) -> dict[str, nn.Parameter]:
    """Everything outside cross-attention (what ESD-u trains)."""
    return {n: p for n, p in unet.named_parameters() if ".attn2." not in n}


def train_only(module: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """requires_grad=False everywhere except `params`: no gradient is computed for the rest."""
    module.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)


# -- fingerprints ----------------------------------------------------------------------------------


def hash_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def model_hash(pipe) -> str:
    """Fingerprint of what an erasure patch depends on: the UNet and the text encoder weights."""
    unet = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    text = {f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    return hash_tensors({**unet, **text})
