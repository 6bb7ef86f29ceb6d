"""A model card (Markdown) for an erasure run: what was erased, how, and with what measured effect.

Written from the ledger (the audited record), so it never claims more than was recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

from sculpt import ledger
from sculpt.io import atomic_write_text


def model_card(run: str | Path) -> str:
    run = Path(run)
    entries = ledger.read_ledger(run / "ledger.jsonl")
    if not entries or entries[0].get("event") != "run" or "config" not in entries[0]:
        raise ValueError(f"{run}: no erasure ledger (ledger.jsonl starting with a 'run' entry)")
    start = entries[0]
    stages = [e for e in entries if e["event"] == "stage"]
    final = next((e for e in reversed(entries) if e["event"] == "final"), None)
    evals = [e for e in entries if e["event"] == "evaluation"]
    cfg = start["config"]
    lines = [
        f"# Model card: {start['base_model']} with concepts erased",
        "",
        f"- Base model: `{start['base_model']}` (weights hash `{start['base_hash'][:16]}...`)",
        f"- Method: `{cfg['method']['name']}`, mode {cfg['mode']}, seed {cfg['seed']}",
        f"- Patch: `patch.safetensors`" + (f" (result hash `{final['result_hash'][:16]}...`)" if final else
                                           " (run not finished)"),
        f"- Software: {', '.join(f'{k} {v}' for k, v in start['versions'].items())}",
        "",
        "## What was erased",
        "",
        "| stage | concept | mapped onto | seconds |",
        "|---|---|---|---|",
    ]
    for e in stages:
        for c in e["concepts"]:
            lines.append(f"| {e['stage']} | {c} | {e['superclasses'].get(c, '')} | {e['seconds']:.0f} |")
    checks = [e["summary"]["check"] for e in stages if "check" in e.get("summary", {})]
    remaining = [c for ch in checks for c in ch["remaining"]]
    if checks:
        judge = checks[0]
        lines += ["", f"Each stage ended with a presence check ({judge['judge']}, {judge['pictures']} pictures on "
                  f"seeds the evaluation never uses; gone: at most {judge['max_share']:.0%} show the concept)."]
        if remaining:
            lines.append(f"**Still drawn when the run ended: {', '.join(remaining)}** (the bound on extra training "
                         "rounds was reached; the erasure of these concepts is incomplete).")
        else:
            lines.append("Every concept passed it"
                         + (f", {sum(ch['extra_rounds'] for ch in checks)} extra round(s) in all." if any(
                             ch["extra_rounds"] for ch in checks) else " within the published budget."))
    lines += ["", "## Settings", "", "```json", json.dumps(cfg["method"], indent=2), "```", "",
              "## Measured effect", ""]
    if evals:
        ev = evals[-1]
        lines += [
            f"Classifier top-1 accuracy on {ev['n']} generated images per prompt (seeds from {ev['seed']}):",
            "",
            "| erased concept | accuracy after erasure |",
            "|---|---|",
            *[f"| {c} | {a:.2f} |" for c, a in ev["per_concept"].items()],
            f"| **Total Acc** | **{ev['total_acc']:.2f}** |",
            "",
            f"Classes not erased: accuracy {ev['kept_acc']:.2f}, "
            f"{100 * ev['kept_drop']:.1f} points below the base model.",
        ]
    else:
        lines.append("Not measured yet: run `sculpt eval --run <this folder>`.")
    lines += ["", "## Checking these claims", "",
              "`sculpt verify <this folder> --remeasure` re-checks the ledger's hash chain, the patch, "
              "the weights and a re-generated sample against the numbers above.", ""]
    return "\n".join(lines)


def write_model_card(run: str | Path) -> Path:
    path = Path(run) / "MODEL_CARD.md"
    atomic_write_text(path, model_card(run))
    return path
