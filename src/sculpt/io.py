"""Writing files so that a crash or a full disk never leaves a half-written one behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`.

    If anything fails (disk full, Ctrl-C) the previous file at `path` is untouched and the temporary
    file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def optimizer_state_to_tensors(state: dict, prefix: str = "optimizer") -> tuple[dict, dict]:
    """An optimizer's state_dict() as safetensors-ready tensors ("<prefix>/<param id>/<key>") and a
    JSON-ready rest (param groups, non-tensor entries): checkpoints that need no pickle."""
    import torch

    tensors, plain = {}, {}
    for pid, entries in state["state"].items():
        for k, v in entries.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}/{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                plain.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def optimizer_state_from_tensors(tensors: dict, meta: dict, prefix: str = "optimizer") -> dict:
    """The inverse of optimizer_state_to_tensors: a state dict for optimizer.load_state_dict."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "/"):
            _, pid, k = key.split("/", 2)
            state.setdefault(int(pid), {})[k] = value
    for pid, entries in meta["plain"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}
