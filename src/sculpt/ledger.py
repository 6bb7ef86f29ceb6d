"""The erasure ledger: an append-only, hash-chained record of what was erased, how, and with what
measured effect, so anyone can check a model's erasure claims later (`sculpt verify`).

Each line of <run>/ledger.jsonl is a JSON object with
    index, time, event, ..., prev (the previous entry's hash), hash (sha256 of the entry without it).
Changing, removing or reordering any line breaks the chain; files named by an entry (patches,
checkpoints) are recorded with their sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


class LedgerError(ValueError):
    """The ledger or a file it names does not match what was recorded."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            raise LedgerError(f"{path}:{n}: not a JSON line (the ledger was edited or truncated)") from None
    return entries


def append(path: str | Path, event: str, **fields: Any) -> dict[str, Any]:
    """Append one entry, chained to the previous one, and fsync it."""
    path = Path(path)
    entries = read_ledger(path)
    entry = {"index": len(entries), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "event": event, **fields, "prev": entries[-1]["hash"] if entries else GENESIS}
    entry["hash"] = _entry_hash(entry)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


def check_chain(path: str | Path, root: str | Path | None = None) -> list[str]:
    """Every problem found in the ledger at `path` (empty list: the chain and its files hold).

    Files are resolved relative to `root` (default: the ledger's folder)."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    problems = []
    try:
        entries = read_ledger(path)
    except LedgerError as exc:
        return [str(exc)]
    if not entries:
        return [f"{path}: no ledger entries"]
    prev = GENESIS
    for i, e in enumerate(entries):
        if e.get("index") != i:
            problems.append(f"entry {i}: index {e.get('index')} out of order")
        if e.get("prev") != prev:
            problems.append(f"entry {i}: does not chain to the entry before it")
        if e.get("hash") != _entry_hash(e):
            problems.append(f"entry {i}: its contents do not match its hash (edited)")
        for rel, digest in (e.get("files") or {}).items():
            f = root / rel
            if not f.is_file():
                problems.append(f"entry {i}: {rel} is missing")
            elif file_sha256(f) != digest:
                problems.append(f"entry {i}: {rel} has changed since it was recorded (sha256 differs)")
        prev = e.get("hash")
    return problems


def record_evaluation(run: str | Path, metrics: dict[str, Any], metrics_file: str | Path) -> dict[str, Any]:
    """Append the measured effect of a run's final patch (what `sculpt verify --remeasure` re-checks).

    The metrics file is recorded by hash only: a later evaluation may overwrite it and append its own
    entry, without breaking the chain."""
    return append(
        Path(run) / "ledger.jsonl", "evaluation",
        total_acc=metrics["forgetting"]["total_acc"], per_concept=metrics["forgetting"]["per_concept"],
        kept_acc=metrics["preservation"]["acc"], kept_drop=metrics["preservation"]["drop"],
        n=metrics["settings"]["n"], seed=metrics["settings"]["seed"], model_hash=metrics["model"]["hash"],
        sampler=metrics["settings"].get("sampler"),
        metrics_file=str(metrics_file), metrics_sha256=file_sha256(metrics_file),
    )
