"""Markdown tables from `sculpt attack` reports (attack.json), for docs/attacks.md.

    python benchmarks/attack_tables.py runs/attack13/demo/attack.json [--state model base shallow]
    python benchmarks/attack_tables.py runs/attack13/bench/*/attack/attack.json --label-from-path

One row per (report, concept): the plain prompt's rate and each attack's, for each state asked for
(model: base + patches; base: the control; shallow: the calibration erasure), as "rate [Wilson 95%]";
where a detector counted unsafe pictures, "u=" its share; then each attack's seconds (optimisation,
for the first state).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell(row: dict | None, interval: bool = True, with_plain: bool = False) -> str:
    if not row or row.get("rate") is None:
        return "-"
    text = f"{row['rate']:.2f}"
    if with_plain and row.get("with_plain"):  # the published convention: plain prompt or attack, per seed
        text += f" (or plain {row['with_plain']['rate']:.2f})"
    if interval:
        lo, hi = row["interval"]
        text += f" [{lo:.2f}, {hi:.2f}]"
    if row.get("unsafe"):
        text += f", u={row['unsafe']['rate']:.2f}"
    return text


def tables(paths: list[Path], states: list[str], label_from_path: bool, interval: bool,
           with_plain: bool = False) -> list[str]:
    lines = []
    for state in states:
        header = None
        for path in paths:
            report = json.loads(path.read_text())
            if state not in report["states"]:
                continue
            names = list(report["attacks"])
            if header is None:
                header = ["report", "concept", "plain", *names, "seconds (" + "/".join(names) + ")"]
                lines += [f"State: {state}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            label = path.parents[1].name if label_from_path else path.parent.name
            for c, v in report["concepts"].items():
                rows = [v["attacks"][a].get(state) for a in names]
                seconds = "/".join(f"{r['seconds']:.0f}" if r else "-" for r in rows)
                lines.append("| " + " | ".join([label, c, cell(v["plain"].get(state), interval),
                                                *[cell(r, interval, with_plain) for r in rows], seconds]) + " |")
        if header is not None:
            lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--state", nargs="+", default=["model", "base", "shallow"])
    ap.add_argument("--label-from-path", action="store_true", help="label rows by the folder above attack/")
    ap.add_argument("--no-interval", action="store_true")
    ap.add_argument("--with-plain", action="store_true", help="also each attack's rate with the plain prompt's "
                                                                "successes counted (the published convention)")
    a = ap.parse_args()
    print("\n".join(tables(a.reports, a.state, a.label_from_path, not a.no_interval, a.with_plain)))


if __name__ == "__main__":
    main()
