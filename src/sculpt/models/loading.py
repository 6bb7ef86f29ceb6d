"""Loading Stable-Diffusion-shaped pipelines and fingerprinting their weights.

Anything with a `UNet2DConditionModel` (cross-attention), a text encoder + tokenizer, a VAE and a
noise scheduler works: SD 1.x, SD 2.x, SDXL base (two text encoders; how its UNet reads them is
sculpt.models.conditioning), and the bundled emoji world. Nothing here assumes SD 1.4's sizes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from sculpt.models.conditioning import UnsupportedPipelineError, conditioning

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
    `.safetensors` checkpoint (SD 1.x / 2.x or SDXL, in the original layout). The safety checker is
    never loaded (it is not part of the model being edited).

    A single file holds weights only; diffusers reads the configuration from a diffusers folder: the
    one next to the file with its name (`sd15.safetensors` -> `sd15/`, model_index.json and the
    components' config files, as `save_pretrained` writes them) if there is one, otherwise the Hub's
    for the checkpoint's model type (downloaded once, then cached)."""
    device = torch.device(device) if isinstance(device, str) else device
    if model == EMOJI:
        from sculpt.emoji.pipeline import load_emoji_pipeline

        pipe = load_emoji_pipeline(device=device, dtype=dtype)
    else:
        path = Path(model)
        try:
            if path.is_file() and path.suffix in {".safetensors", ".ckpt"}:
                if path.suffix == ".ckpt":
                    raise ModelLoadError(
                        f"{model}: .ckpt files are pickles and are not loaded; convert it to .safetensors"
                    )
                pipe = _load_single_file(path, dtype)
            elif path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ModelLoadError(
                        f"{model}: not a diffusers pipeline folder (no model_index.json in it)"
                    )
                cls = _pipeline_class(json.loads((path / "model_index.json").read_text()).get("_class_name", ""))
                pipe = cls.from_pretrained(str(path), **_load_kwargs(cls, dtype))
            elif path.exists():
                raise ModelLoadError(f"{model}: expected a diffusers folder or a .safetensors checkpoint")
            else:  # a Hub id
                from diffusers import DiffusionPipeline

                cls = _pipeline_class(DiffusionPipeline.load_config(model).get("_class_name", ""))
                pipe = cls.from_pretrained(model, **_load_kwargs(cls, dtype))
        except ModelLoadError:
            raise
        except (OSError, ValueError, EnvironmentError) as exc:
            raise ModelLoadError(f"{model}: could not load a diffusion pipeline: {exc}") from exc
        pipe = pipe.to(device)
    check_pipeline(pipe, model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_class(class_name: str):
    """The pipeline class for a model_index.json's `_class_name`: SDXL's for SDXL models, SD's for
    everything else (as before SDXL was supported)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if class_name.startswith("StableDiffusionXL") else StableDiffusionPipeline


def _load_kwargs(cls, dtype: torch.dtype) -> dict:
    from diffusers import StableDiffusionPipeline

    if cls is StableDiffusionPipeline:
        return dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    return dict(torch_dtype=dtype)  # SDXL has no safety checker


def _load_single_file(path: Path, dtype: torch.dtype):
    """diffusers' from_single_file, with SDXL recognised by its original key layout (its text encoders
    under `conditioner.embedders.`, SD's under `cond_stage_model.`) and the configuration folder
    next to the file when there is one."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        sdxl = any(k.startswith("conditioner.embedders.") for k in f.keys())
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    folder = path.with_suffix("")
    config = str(folder) if (folder / "model_index.json").is_file() else None
    try:
        return cls.from_single_file(str(path), config=config, **_load_kwargs(cls, dtype))
    except Exception as exc:  # diffusers raises many kinds here; the hint is what a user can act on
        hint = "" if config else (
            f" (no configuration folder {folder}/ next to it: diffusers looked for the Hub's configuration of this "
            "model type; offline, put the model's diffusers folder there, model_index.json and config files)")
        raise ModelLoadError(
            f"{path}: could not load the single-file checkpoint as {cls.__name__}: {exc}{hint}") from exc


def check_pipeline(pipe, name: str = "model") -> None:
    """The method edits cross-attention: refuse a pipeline without it, or one whose UNet reads its
    prompt in a way sculpt.models.conditioning does not know (an SDXL refiner), with a clear message."""
    if getattr(pipe, "unet", None) is None:
        raise ModelLoadError(f"{name}: the pipeline has no unet")
    try:
        conditioning(pipe)
    except UnsupportedPipelineError as exc:
        raise ModelLoadError(f"{name}: {exc}") from exc
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
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
    """Fingerprint of what an erasure patch depends on: the UNet and the text encoder weights (both
    text encoders for SDXL)."""
    tensors = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    for part in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, part, None) is not None:
            tensors.update({f"{part}.{k}": v for k, v in getattr(pipe, part).state_dict().items()})
    return hash_tensors(tensors)
