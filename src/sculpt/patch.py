"""Erasure patches: only the tensors an erasure changed, as safetensors with their provenance.

A patch replaces tensors of the model it was made on (bit for bit: base + patch == trained model).
It records the hash of that model (`base_hash`) and of the result (`result_hash`), so patches stack
in order (each one's base is the previous one's result) and a patch meant for another model is
refused unless forced.

A patch also carries what a later run stacked on it needs to go on as one run over all the concepts
would (sculpt-patch/2): the method's state after its last stage (`method_state`, e.g. the Dynamic
Mask's freeze mask, stored as `method.<key>` tensors; never applied to the model) and, in the
metadata, every concept erased so far with the data settings and seed it was trained on
(`erased`) and the number of stages behind it (`stages_total`).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sculpt.io import atomic_write
from sculpt.models.loading import model_hash

FORMAT = "sculpt-patch/2"
READABLE_FORMATS = ("sculpt-patch/1", FORMAT)  # /1: no method state, no `erased` list


class PatchError(ValueError):
    """A patch file that cannot be read or does not fit the model."""


@dataclass
class Patch:
    tensors: dict[str, torch.Tensor]  # "unet.<parameter name>" -> new value
    metadata: dict[str, Any] = field(default_factory=dict)
    method_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the method's state_dict()

    @property
    def concepts(self) -> list[str]:
        return list(self.metadata.get("concepts", []))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.tensors.values(), *self.method_state.values()))


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    from sculpt import __version__

    return {"sculpt": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def make_patch(unet: torch.nn.Module, base: dict[str, torch.Tensor], metadata: dict[str, Any],
               method_state: dict[str, torch.Tensor] | None = None) -> Patch:
    """Tensors of `unet` that differ from `base` (a name -> tensor snapshot taken before training)."""
    state = unet.state_dict()
    tensors = {
        f"unet.{n}": state[n].detach().to("cpu").clone().contiguous()
        for n, before in base.items()
        if not torch.equal(state[n].detach().to(before.device), before)
    }
    method_state = {k: v.detach().to("cpu").contiguous() for k, v in (method_state or {}).items()}
    return Patch(tensors, {"format": FORMAT, **metadata}, method_state)


def save_patch(patch: Patch, path: str | Path) -> Path:
    path = Path(path)
    meta = {"sculpt": json.dumps(patch.metadata, sort_keys=True, default=str)}
    tensors = {**patch.tensors, **{f"method.{k}": v for k, v in patch.method_state.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_patch(path: str | Path) -> Patch:
    """Read a patch without executing anything from the file (safetensors only)."""
    path = Path(path)
    if not path.is_file():
        raise PatchError(f"{path}: no such patch file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"\x80\x02" or head[:2] == b"PK":  # a pickle or a torch zip archive
        raise PatchError(f"{path}: this is a pickle/torch archive, not a safetensors patch; refusing to load it")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("sculpt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PatchError(f"{path}: not a readable safetensors file (corrupt or truncated?): {exc}") from None
    if raw is None:
        raise PatchError(f"{path}: a safetensors file but not a sculpt patch (no 'sculpt' metadata)")
    meta = json.loads(raw)
    if meta.get("format") not in READABLE_FORMATS:
        raise PatchError(f"{path}: unsupported patch format {meta.get('format')!r} (expected {FORMAT})")
    state = {k.removeprefix("method."): v for k, v in tensors.items() if k.startswith("method.")}
    return Patch({k: v for k, v in tensors.items() if not k.startswith("method.")}, meta, state)


@torch.no_grad()
def apply_patch(pipe, patch: Patch, force: bool = False, check_hash: bool = True) -> None:
    """Replace the patched tensors of pipe.unet in place.

    Refuses a patch made on another model (its base hash differs from this model's) unless forced."""
    if check_hash and "base_hash" in patch.metadata:
        current = model_hash(pipe)
        if current != patch.metadata["base_hash"] and not force:
            raise PatchError(
                "this patch was made on another model: patch base hash "
                f"{patch.metadata['base_hash'][:16]}..., model hash {current[:16]}... "
                "(apply the patches it was stacked on first, or pass force=True / --force)"
            )
    check_fits(pipe, patch)
    params = dict(pipe.unet.state_dict())
    for key, value in patch.tensors.items():
        params[key.removeprefix("unet.")].copy_(value.to(params[key.removeprefix("unet.")].dtype))


def check_fits(pipe, patch: Patch) -> None:
    """Every tensor of the patch names a UNet tensor of this model, with its shape."""
    params = dict(pipe.unet.state_dict())
    for key, value in patch.tensors.items():
        if not key.startswith("unet."):
            raise PatchError(f"patch tensor {key!r} is not a UNet tensor")
        name = key.removeprefix("unet.")
        if name not in params:
            raise PatchError(f"patch tensor {key!r} does not exist in this model")
        if params[name].shape != value.shape:
            raise PatchError(f"patch tensor {key!r} has shape {tuple(value.shape)}, model has {tuple(params[name].shape)}")


def apply_patches(pipe, paths: list[str | Path], force: bool = False) -> list[Patch]:
    """Stack patches in order onto pipe."""
    patches = []
    for path in paths:
        patch = load_patch(path)
        apply_patch(pipe, patch, force=force)
        patches.append(patch)
    return patches
