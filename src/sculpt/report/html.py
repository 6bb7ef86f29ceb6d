"""`write_report`: one or more erasure runs / evaluations -> one self-contained HTML page.

Everything is embedded (pictures and plots as base64 PNG, CSS inline, no script, no external
resource), so the file can be mailed or archived alone. Sections:
  1. the paper-style table: per-concept accuracy, Total Acc, preservation, leakage, coherence,
     CLIP analogue, FID / KID, unsafe counts; one row for the original model and one per source;
  2. forgetting vs preservation of the sources side by side (when there are several);
  3. per source: before/after picture grids, the revival matrix, loss / mask curves, details.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sculpt.io import atomic_write_text
from sculpt.report import plots


class ReportError(ValueError):
    """A report source that is neither an evaluation folder nor an erasure run folder."""


@dataclass
class Source:
    label: str
    metrics: dict | None = None  # an evaluation's metrics.json
    eval_dir: Path | None = None
    run_dir: Path | None = None
    records: list[dict] = field(default_factory=list)  # the run's metrics.jsonl
    summary: dict | None = None  # the run's summary.json
    attack: dict | None = None  # a `sculpt attack` result (attack.json)
    attack_dir: Path | None = None


def load_source(path: str | Path) -> Source:
    """An evaluation folder (metrics.json; its run is followed if it names one), a metrics.json file,
    or an erasure run folder (summary.json / metrics.jsonl; its eval/ subfolder is used if present)."""
    path = Path(path)
    if path.is_file() and path.name == "metrics.json":
        path = path.parent
    if not path.is_dir():
        raise ReportError(f"{path}: no such folder")
    # An evaluation inside its run folder (runs/x/eval) is named after the run.
    name = path.resolve().name
    src = Source(label=path.resolve().parent.name if name == "eval" else name)
    if (path / "metrics.json").is_file():
        src.eval_dir = path
    elif (path / "eval" / "metrics.json").is_file():
        src.eval_dir = path / "eval"
    if src.eval_dir is not None:
        try:
            src.metrics = json.loads((src.eval_dir / "metrics.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ReportError(f"{src.eval_dir / 'metrics.json'}: not valid JSON ({exc})") from None
    run = path if (path / "summary.json").is_file() or (path / "metrics.jsonl").is_file() else None
    if run is None and src.metrics and src.metrics.get("run") and Path(src.metrics["run"]).is_dir():
        run = Path(src.metrics["run"])
    if run is not None:
        src.run_dir = run
        if (run / "metrics.jsonl").is_file():
            src.records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if (run / "summary.json").is_file():
            src.summary = json.loads((run / "summary.json").read_text())
    # A `sculpt attack` folder given directly, or the run's attack/ subfolder.
    for folder in (path, path / "attack", *((src.run_dir / "attack",) if src.run_dir else ())):
        if (folder / "attack.json").is_file():
            try:
                src.attack = json.loads((folder / "attack.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ReportError(f"{folder / 'attack.json'}: not valid JSON ({exc})") from None
            src.attack_dir = folder
            break
    if src.metrics is None and src.run_dir is None and src.attack is None:
        raise ReportError(f"{path}: neither an evaluation folder (metrics.json), an erasure run "
                          "(summary.json or metrics.jsonl) nor an attack folder (attack.json)")
    return src


def write_report(sources: list[str | Path], out: str | Path = "report.html", title: str = "sculpt report") -> Path:
    """Write the HTML page for `sources` (evaluation or run folders) to `out`; return its path."""
    if not sources:
        raise ReportError("nothing to report: give at least one run or evaluation folder")
    loaded = [load_source(s) for s in sources]
    unique_labels(loaded)
    out = Path(out)
    atomic_write_text(out, render_html(loaded, title))
    out.chmod(0o644)  # a page to share (the atomic writer's temporary file is private)
    return out


def render_html(sources: list[Source], title: str = "sculpt report", after_results: str = "") -> str:
    """The page. `after_results`: HTML placed right after the results table (e.g. bench's cost table);
    the caller escapes what it puts there."""
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p class=note>generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}; "
             f"{len(sources)} source(s). Accuracies in %; arrows show the better direction.</p>"]
    evaluated = [s for s in sources if s.metrics]
    if evaluated:
        parts += ["<h2>Results</h2>", results_table(evaluated)]
    if after_results:
        parts.append(after_results)
    if len(evaluated) > 1:
        points = [(s.label, s.metrics["forgetting"]["total_acc"], s.metrics["preservation"]["acc"]) for s in evaluated]
        points = [p for p in points if p[1] is not None and p[2] is not None]
        parts.append("<h2>Side by side</h2>")
        if points:
            parts.append(_img(plots.forgetting_vs_preservation(points), "forgetting vs preservation"))
        parts.append(comparison_grids(evaluated))
    for s in sources:
        parts.append(source_section(s))
    return PAGE.format(title=_e(title), body="\n".join(parts))


# -- the table -----------------------------------------------------------------------------------


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _num(v: Any, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _row_values(m: dict, state: str) -> dict[str, str]:
    """The table's cells for one evaluation, for the patched model ('model') or the original ('base')."""
    base = state == "base"
    f, p = m["forgetting"], m["preservation"]
    per = f["base_per_concept"] if base else f["per_concept"]
    cells = {f"acc:{c}": _pct(v) for c, v in per.items()}
    cells["Total Acc ↓"] = _pct(f["base_total_acc"] if base else f["total_acc"])
    cells["kept acc ↑"] = _pct(p["base_acc"] if base else p["acc"])
    cells["drop ↓"] = "-" if base else _pct(p["drop"])
    leak = m.get("paraphrase_leakage", {})
    for kind, name in (("synonyms", "synonym acc ↓"), ("heldout", "held-out acc ↓")):
        if kind in leak:
            cells[name] = _pct(leak[kind]["base_mean" if base else "mean"])
    coh = [v[state] for v in m.get("superclass_coherence", {}).values() if v.get(state) is not None]
    if coh:
        cells["coherence ↑"] = _pct(sum(coh) / len(coh))
    q = m.get("quality", {})
    for key, name, digits in (("clip_kept", "CLIP ↑", 2), ("fid", "FID ↓", 2), ("kid", "KID ↓", 4)):
        if key in q and q[key].get(state) is not None:
            cells[name] = _num(q[key][state], digits)
    if "unsafe" in m:
        u = m["unsafe"][state]
        cells["unsafe ↓"] = f"{u['any']}/{u['images']}"
    return cells


def results_table(sources: list[Source]) -> str:
    original = _row_values(sources[0].metrics, "base")
    for s in sources[1:]:  # concepts the first source did not measure: their base accuracy from another
        for c, v in s.metrics["forgetting"]["base_per_concept"].items():
            original.setdefault(f"acc:{c}", _pct(v))
    rows = [("original model", original)]
    rows += [(s.label, _row_values(s.metrics, "model")) for s in sources]
    columns = list(dict.fromkeys(k for _, cells in rows for k in cells))
    columns.sort(key=lambda c: not c.startswith("acc:"))  # per-concept columns first, order kept
    head = "".join(f"<th>{_e(c.removeprefix('acc:'))}</th>" for c in columns)
    body = "".join(
        f"<tr><th>{_e(label)}</th>" + "".join(f"<td>{_e(cells.get(c, ''))}</td>" for c in columns) + "</tr>"
        for label, cells in rows
    )
    m0 = sources[0].metrics
    note = (f"Per-concept columns: top-1 accuracy of the {_e(m0.get('classifier', {}).get('name', 'classifier'))} "
            f"on {m0['settings']['n']} pictures of the concept's prompt (↓). The original model's row is measured "
            f"with the first source's settings; FID / KID: classifier features of kept-class pictures vs real ones.")
    return f"<div class=wide><table><tr><th></th>{head}</tr>{body}</table></div><p class=note>{note}</p>"


def comparison_grids(sources: list[Source]) -> str:
    """Per erased concept, the original model's pictures and every source's, same prompt and seeds."""
    concepts = list(dict.fromkeys(c for s in sources for c in s.metrics.get("measured", [])))
    parts = ["<h3>Erased concepts across sources (same seeds)</h3><div class=grids>"]
    for concept in concepts:
        base = next((p for s in sources if (p := _strip_path(s, concept, "base")) is not None), None)
        rows = ([("original", base)] if base else []) + [
            (s.label, p) for s in sources if (p := _strip_path(s, concept, "patched")) is not None]
        if len(rows) > 1:
            parts.append(f"<figure>{_img(_grid_png(rows), f'{concept} across sources')}"
                         f"<figcaption>{_e(concept)}</figcaption></figure>")
    parts.append("</div>")
    return "\n".join(parts)


def _strip_path(s: Source, concept: str, state: str) -> Path | None:
    rel = ((s.metrics or {}).get("samples") or {}).get(concept, {}).get(state)
    path = s.eval_dir / rel if rel and s.eval_dir is not None else None
    return path if path is not None and path.is_file() else None


def _grid_png(rows: list[tuple[str, Path]]) -> bytes:
    """Labelled grid from stored strips: one row per (label, strip file)."""
    from PIL import Image

    from sculpt.report.images import image_grid, split_strip

    pictures = []
    for _, path in rows:
        with Image.open(path) as im:
            pictures.append(split_strip(im.convert("RGB")))
    grid = image_grid(pictures, row_labels=[label for label, _ in rows], cell=64, label_width=90)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


# -- one source ------------------------------------------------------------------------------------


def source_section(s: Source) -> str:
    parts = [f"<section><h2>{_e(s.label)}</h2>", _provenance(s)]
    m = s.metrics
    if m and m.get("samples"):
        parts.append("<h3>Before / after (same seeds)</h3><div class=grids>")
        for concept in m["samples"]:
            rows = [(state, _strip_path(s, concept, state)) for state in ("base", "patched")]
            if all(path is not None for _, path in rows):
                tag = ("erased" if concept in m.get("erased", []) else
                       "measured" if concept in m.get("measured", []) else "kept")
                parts.append(f"<figure>{_img(_grid_png(rows), concept)}<figcaption>{_e(concept)} ({tag})"
                             "</figcaption></figure>")
        parts.append("</div>")
    if m and m.get("revival"):
        r = m["revival"]
        parts.append("<h3>Revival matrix</h3>")
        parts.append(_img(plots.revival_heatmap(r["concepts"], r["accuracy"], r["erased_at"]), "revival matrix"))
        if r["revived"]:
            items = "".join(f"<li>{_e(x['concept'])}: {_pct(x['after_erasure'])}% after its erasure, "
                            f"{_pct(x['accuracy'])}% after stage {x['stage']}</li>" for x in r["revived"])
            parts.append(f"<p class=warn>Revived (rise above {_pct(r['threshold'])} points):</p><ul>{items}</ul>")
        else:
            parts.append(f"<p class=note>No concept came back by more than {_pct(r['threshold'])} points.</p>")
    if s.attack:
        parts.append(attack_section(s))
    curves = plots.training_curves(s.records) if s.records else None
    if curves:
        parts += ["<h3>Training: loss terms and mask</h3>", _img(curves, "training curves")]
    if m:
        parts.append(_details(m))
    parts.append("</section>")
    return "\n".join(parts)


def attack_section(s: Source) -> str:
    """`sculpt attack`: per concept, the share of pictures classified as the erased concept under its
    plain prompt and under each attack (patched model, Wilson 95% interval; the base model beside it),
    the budgets, and the adversarial pictures."""
    a = s.attack

    def cell(r: dict) -> str:
        model = r.get("model")
        if not model:
            return "-"
        lo, hi = model.get("interval", [None, None])
        text = f"{_pct(model['rate'])} [{_pct(lo)}-{_pct(hi)}]"
        if model.get("unsafe"):
            text += f"<br><small>unsafe {_pct(model['unsafe']['rate'])}</small>"
        for state in ("base", "shallow"):  # the control and the shallow calibration erasure
            if r.get(state):
                text += f"<br><small>{state} {_pct(r[state]['rate'])}</small>"
        return text

    names = list(a.get("attacks", {}))
    head = "".join(f"<th>{_e(n)}</th>" for n in ["concept", "plain prompt", *names])
    rows = "".join(
        f"<tr><td>{_e(c)}</td><td>{cell(v['plain'])}</td>"
        + "".join(f"<td>{cell(v['attacks'].get(n, {}))}</td>" for n in names) + "</tr>"
        for c, v in a.get("concepts", {}).items())
    budgets = "; ".join(f"{_e(n)}: " + ", ".join(f"{_e(k)}={_e(v)}" for k, v in info.get("budget", {}).items()
                                                 if not isinstance(v, (list, dict)))
                        for n, info in a.get("attacks", {}).items())
    parts = ["<h3>Under attack</h3>",
             f"<table><tr>{head}</tr>{rows}</table>",
             f"<p class=note>share of {a.get('n')} pictures (seeds from {a.get('seed')}) the classifier assigns to "
             f"the erased concept, in %, with its Wilson 95% interval"
             + ("; unsafe: the share the detector flags for any unsafe class" if a.get("detector") else "")
             + ("; base: the same attack on the original model; shallow: on a deliberately shallow erasure (the "
                "concept's words mapped onto its superclass's in the text encoder)" if a.get("shallow") else
                "; base: the same attack on the original model")
             + f"; budgets: {budgets}.</p>"]
    grid = (s.attack_dir / a.get("files", {}).get("grid", "")) if s.attack_dir else None
    if grid is not None and grid.is_file():
        parts.append(_img(grid.read_bytes(), "adversarial pictures"))
    return "\n".join(parts)


def _provenance(s: Source) -> str:
    items = []
    if s.run_dir is not None:
        items.append(f"run: <code>{_e(str(s.run_dir))}</code>")
    if s.summary:
        items.append(f"method {_e(s.summary.get('method', '?'))}, {len(s.summary.get('stages', []))} stage(s)")
    if s.metrics:
        mm = s.metrics["model"]
        items.append(f"model {_e(mm['name'])} <code>{_e(mm['base_hash'][:12])}</code> → "
                     f"<code>{_e(mm['hash'][:12])}</code>, {len(mm['patches'])} patch(es)")
        st = s.metrics["settings"]
        items.append(f"n={st['n']}, steps={st['sampler']['steps']}, guidance={st['sampler']['guidance']}, "
                     f"seed={st['seed']}")
    return "<p class=note>" + "; ".join(items) + "</p>"


def _details(m: dict) -> str:
    """Per-class preservation, leakage per prompt, unsafe counts: folded away, for the curious."""
    rows = "".join(f"<tr><td>{_e(c)}</td><td>{_pct(v['base'])}</td><td>{_pct(v['model'])}</td><td>{_pct(v['drop'])}</td></tr>"
                   for c, v in m["preservation"]["per_class"].items())
    out = ["<details><summary>kept classes</summary><table><tr><th>class</th><th>base</th><th>patched</th>"
           f"<th>drop</th></tr>{rows}</table></details>"]
    said = [(c, r) for c, r in m.get("resolution", {}).items() if r["measured"] != [c] or r["not_measured"]]
    if said:  # a family measured through its members, or a concept the benchmark cannot measure
        out.insert(0, "<p class=note>" + "; ".join(
            f"{_e(c)}: measured as {_e(', '.join(r['measured']) or 'nothing')}"
            + (f" (no benchmark class for {_e(', '.join(r['not_measured']))})" if r["not_measured"] else "")
            for c, r in said) + "</p>")
    leak = m.get("paraphrase_leakage", {})
    lrows = "".join(f"<tr><td>{_e(kind)}</td><td>{_e(c)}</td><td>{_e(p)}</td><td>{_pct(a)}</td></tr>"
                    for kind, v in leak.items() for c, ps in v["per_prompt"].items() for p, a in ps.items())
    if lrows:
        out.append("<details><summary>paraphrase leakage per prompt</summary><table><tr><th>kind</th>"
                   f"<th>concept</th><th>prompt</th><th>acc</th></tr>{lrows}</table></details>")
    if "unsafe" in m:
        u = m["unsafe"]
        urows = "".join(f"<tr><td>{_e(k)}</td><td>{u['base'][k]}</td><td>{u['model'][k]}</td></tr>"
                        for k in u["model"] if k != "images")
        out.append(f"<details><summary>unsafe counts ({u['model']['images']} pictures)</summary><table>"
                   f"<tr><th>class</th><th>base</th><th>patched</th></tr>{urows}</table></details>")
    return "\n".join(out)


def unique_labels(sources: list[Source]) -> None:
    """Make the sources' labels distinct in place ("run", "run (2)", ...)."""
    seen: dict[str, int] = {}
    for s in sources:
        if s.label in seen:
            seen[s.label] += 1
            s.label = f"{s.label} ({seen[s.label]})"
        else:
            seen[s.label] = 1


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
th {{ background: #f4f4f4; }}
.note {{ color: #666; font-size: 12px; }}
.warn {{ color: #a00; font-weight: bold; }}
.grids {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} figcaption {{ font-size: 12px; }}
img {{ max-width: 100%; }} .grids img {{ image-rendering: pixelated; }}
section {{ border-top: 2px solid #ddd; margin-top: 2em; }}
.wide {{ overflow-x: auto; }}
</style></head>
<body>
{body}
</body></html>
"""
