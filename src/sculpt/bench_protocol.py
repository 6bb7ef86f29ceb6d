"""`run_protocol`: the fair benchmark a protocol file fixes (issue 12), run unit by unit, resumably.

    summary = run_protocol("benchmarks/protocol.yaml", Path("runs/protocol"), workers=2)
    sculpt bench --protocol benchmarks/protocol.yaml --out runs/protocol --workers 2   # the same

Phase dev: every setting of every method's grid, each on top of the method's bench preset
(sculpt.bench.EMOJI_PRESETS), erases the development concepts in order (training seed seeds[0]);
each run is evaluated with n_dev pictures per prompt on the dev concepts and the dev-kept classes.
The selection rule (sculpt.protocol.select) then picks one setting per method from these results.
Phase test: each method's "paper defaults" (its bench preset unchanged) and its selected setting
erase the test concepts once per seed s in `seeds` (training seed s, evaluation pictures seeded
EVAL_SEED_STRIDE * s + i), n_test pictures per prompt, scored on the test-kept classes. A selected
setting that is the preset itself is run once and reported in both rows.

One unit of work = (phase, method, setting, seed), in its own folder:
    dev/<method>/s<k>/seed<s>/                 k: the setting's place in the grid (1-based, file order)
    test/<method>/default|s<k>/seed<s>/
Each holds sculpt.bench's folder for one method (<method>/ run, <method>/eval/, specs/, bench.md)
and, once the run and its evaluation are finished, unit.json (written atomically, last): the unit's
spec, its identity hash and its scores.

Resume: a unit with unit.json is never redone (if its identity differs, the protocol, a preset or the
data changed, and the runner stops rather than mix results). A unit without it is handed to
sculpt.bench.run_bench again, which keeps a finished erase, resumes an unfinished one from its
checkpoint (sculpt.erase) and redoes a missing evaluation. A lock file (fcntl) keeps two processes
off one unit. Kill the runner at any time and start the same command again.

Workers: workers=1 runs the units in this process, one after another; workers=N runs N at a time,
each unit (its erase and its evaluation) in its own `python -m sculpt.bench_protocol UNIT.json OUT`
process with one thread (OMP_NUM_THREADS=1): on a 2-core CPU two single-thread processes do about twice the work of one
(one process gains 1.2x from a second thread in training, 1.7x in sampling; docs/results.md).

Output (rewritten at the end of every call, from all the unit.json files in `out`, whichever call
ran them; a unit's process seconds exclude its worker's Python start-up):
    protocol.json      the protocol, every unit's scores, selections, the test table, differences, compute
    protocol.md        the same as tables; report.html: those tables and the dev Pareto plot (dev_pareto.png)
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from sculpt.io import atomic_write_text
from sculpt.protocol import Protocol, bootstrap_interval, load_protocol, select

UNIT_FORMAT = "sculpt-protocol-unit/1"
PAPER_METHOD = "sculpting"  # the home method: never "the best baseline"
EVAL_SEED_STRIDE = 1000  # seed s evaluates pictures 1000 s .. 1000 s + n - 1: no picture shared between seeds
N_REVIVAL = 4  # pictures per concept and stage for run_bench's revival matrix (not part of the protocol's table)
PHASES = ("dev", "test", "all", "report")  # report: no unit is run, the report is written from the finished ones


class ProtocolRunError(RuntimeError):
    """The protocol run cannot go on (a unit folder holding other settings, a failed unit, dev unfinished)."""


# -- what is run -----------------------------------------------------------------------------------


@dataclass
class World:
    """What a protocol runs on: the model, each method's bench preset ("paper defaults"), the shared
    data settings, the benchmark's classes in order (for the kept split) and each concept's spec."""

    model: str
    presets: dict[str, dict]
    data: dict
    classes: list[str]
    concepts: dict[str, dict]  # name -> concept spec (name, superclass, synonyms, ...)


def emoji_world(p: Protocol) -> World:
    """The emoji world: sculpt.bench.EMOJI_PRESETS, the demo's data settings, the taxonomy's classes
    and its concept specs (sculpt.emoji.demo.demo_spec)."""
    from sculpt.bench import EMOJI_PRESETS
    from sculpt.emoji.demo import EMOJI_DATA, demo_spec
    from sculpt.emoji.taxonomy import load_taxonomy

    names = p.dev_concepts + p.test_concepts
    specs = demo_spec(names, Path(".")).concepts
    return World("emoji", EMOJI_PRESETS, dict(EMOJI_DATA), load_taxonomy().names,
                 {c.name: c.model_dump(mode="json") for c in specs})


@dataclass
class Unit:
    """One unit of work: one method at one setting erases one concept list with one seed, evaluated once."""

    phase: str  # "dev" | "test"
    method: str
    setting: str  # "default" (the bench preset) or "s<k>" (the k-th setting of the grid)
    seed: int  # training seed; evaluation pictures are seeded EVAL_SEED_STRIDE * seed + i
    preset: dict  # the method's settings as run (the bench preset with the grid's values on top)
    concepts: list[dict]
    kept: list[str]  # the kept classes scored
    n: int  # pictures per prompt
    model: str
    data: dict
    quality: bool  # CLIP analogue and FID on the kept classes

    @property
    def folder(self) -> Path:
        return Path(self.phase) / self.method / self.setting / f"seed{self.seed}"

    @property
    def eval_seed(self) -> int:
        return EVAL_SEED_STRIDE * self.seed

    @property
    def label(self) -> str:
        return f"{self.phase} {self.method} {self.setting} seed {self.seed}"

    def identity(self) -> str:
        """Hash of everything that determines the unit's result."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()


def _preset(world: World, method: str, setting: dict, quick: bool) -> dict:
    from sculpt.bench import quick_preset
    from sculpt.methods import get_method

    preset = {"name": method, **world.presets.get(method, {}), **setting}
    if quick:
        preset = quick_preset({**get_method(method).config_class().model_dump(mode="json"), **preset})
    return preset


def dev_units(p: Protocol, world: World, methods: list[str], quick: bool = False) -> list[Unit]:
    """Every setting of every method's grid on the development concepts, seed seeds[0], n_dev pictures,
    scored on the dev-kept classes (methods in the given order, settings in grid order)."""
    dev_kept, _ = p.kept_split(world.classes)
    concepts = [world.concepts[c] for c in p.dev_concepts]
    n = min(p.n_dev, 4) if quick else p.n_dev
    return [Unit("dev", m, f"s{k}", p.seeds[0], _preset(world, m, setting, quick), concepts, dev_kept, n,
                 world.model, world.data, quality=False)
            for m in methods for k, setting in enumerate(p.settings(m), 1)]


def test_units(p: Protocol, world: World, selected: dict[str, str], quick: bool = False) -> list[Unit]:
    """For each method (selected: method -> its chosen setting "s<k>"), the paper defaults and the chosen
    setting on the test concepts, once per seed, n_test pictures, scored on the test-kept classes. A
    chosen setting equal to the preset is the "default" unit (run once)."""
    _, test_kept = p.kept_split(world.classes)
    concepts = [world.concepts[c] for c in p.test_concepts]
    n = min(p.n_test, 4) if quick else p.n_test
    units, same = [], tuned_is_default(p, world, selected, quick)
    for m, chosen in selected.items():
        default, tuned = _default_and_selected(p, world, m, chosen, quick)
        settings = [("default", default)] + ([] if m in same else [(chosen, tuned)])
        units += [Unit("test", m, name, seed, preset, concepts, test_kept, n, world.model, world.data, quality=True)
                  for seed in p.seeds for name, preset in settings]
    return units


def _same_config(method: str, a: dict, b: dict) -> bool:
    """Whether two presets configure the method identically (a value given equal to its default counts
    as not given)."""
    from sculpt.methods import get_method

    config = get_method(method).config_class
    return config(**{k: v for k, v in a.items() if k != "name"}) == config(**{k: v for k, v in b.items() if k != "name"})


def tuned_is_default(p: Protocol, world: World, selected: dict[str, str], quick: bool = False) -> set[str]:
    """The methods whose selected setting is their bench preset (one test unit per seed, both rows)."""
    return {m for m, chosen in selected.items() if _same_config(m, *_default_and_selected(p, world, m, chosen, quick))}


def _default_and_selected(p: Protocol, world: World, method: str, chosen: str, quick: bool) -> tuple[dict, dict]:
    """The method's bench preset and its selected setting ("s<k>", the k-th of its grid) on top of it."""
    return _preset(world, method, {}, quick), _preset(world, method, p.settings(method)[int(chosen[1:]) - 1], quick)


# -- running one unit ------------------------------------------------------------------------------


def unit_result(unit: Unit, out: Path) -> dict | None:
    """The finished unit's record (unit.json), None when the unit is not finished; refuses a folder
    whose record is another unit's (the protocol, a preset or the data changed since)."""
    path = Path(out) / unit.folder / "unit.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("identity") != unit.identity():
        raise ProtocolRunError(f"{path.parent} holds a finished unit with other settings (the protocol, a preset, "
                               "the concepts or the data changed); move it away or choose another --out")
    if "base" not in record["result"]:  # written before records kept the original model's scores: its own eval has them
        metrics = path.parent / unit.method / "eval" / "metrics.json"
        if metrics.is_file():
            record["result"]["base"] = base_scores(json.loads(metrics.read_text()))
    return record


@contextmanager
def _unit_lock(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProtocolRunError(f"{folder} is being run by another process") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def unit_scores(metrics: dict, cost: dict, method: str) -> dict[str, Any]:
    """What the protocol keeps of one evaluation (sculpt.eval metrics.json) and one run's cost
    (sculpt.bench bench.json): the means, and the per-class numbers the intervals resample."""
    from sculpt.bench import metrics_row

    row = metrics_row(method, metrics)
    base = metrics_row("base", metrics, "base")
    return {
        "total_acc": row["total_acc"], "kept_acc": row["preservation_acc"], "coherence": row["coherence"],
        "clip": row["clip"], "fid": row["fid"],
        "base_total_acc": base["total_acc"], "base_kept_acc": base["preservation_acc"],
        "per_concept": metrics["forgetting"]["per_concept"],
        "per_kept": {c: v["model"] for c, v in metrics["preservation"]["per_class"].items()},
        "per_coherence": {c: v["model"] for c, v in metrics["superclass_coherence"].items() if v["model"] is not None},
        "fit_s": cost.get("fit_s"), "wall_s": cost.get("wall_s"), "peak_mem_mb": cost.get("peak_mem_mb"),
        "eval_s": metrics.get("timings", {}).get("total"),
        "base": base_scores(metrics),
    }


def base_scores(metrics: dict) -> dict[str, Any]:
    """The original model's per-class scores in one evaluation (the same pictures for every unit of a
    seed: same model, same evaluation seeds), from which the test table's reference row is made."""
    from sculpt.bench import metrics_row

    base = metrics_row("base", metrics, "base")
    return {"per_concept": metrics["forgetting"]["base_per_concept"],
            "per_kept": {c: v["base"] for c, v in metrics["preservation"]["per_class"].items()},
            "per_coherence": {c: v["base"] for c, v in metrics["superclass_coherence"].items() if v["base"] is not None},
            "clip": base["clip"], "fid": base["fid"]}


def run_unit(unit: Unit, out: Path, *, sampler=None, isolate: bool = False, progress: bool = False,
             echo: Callable[[str], None] = print, **bench_kwargs) -> dict:
    """Run one unit unless it is finished: sculpt.bench.run_bench for its one method in out/unit.folder
    (erase, then evaluate on the unit's kept classes), then unit.json. Returns the unit's record.
    sampler: the evaluation sampler (default: the model's). isolate: run_bench's; default False: the
    erase runs in the unit's process (a fresh one per unit when workers > 1), which saves two process
    starts and model loads per unit (~10 s on the emoji world) at the price of a lower-bound memory
    measure (RSS rise), which the protocol's table does not report. bench_kwargs: passed to run_bench
    (pipe_factory, worker_factory, benchmark, classifier, scorer, cache, device)."""
    import torch

    from sculpt.bench import run_bench
    from sculpt.eval.evaluate import EvalSettings
    from sculpt.models.loading import resolve_device

    out = Path(out)
    done = unit_result(unit, out)
    if done is not None:
        return done
    folder = out / unit.folder
    with _unit_lock(folder):
        started = folder.joinpath(unit.method).exists()
        t, t_wall = time.perf_counter(), time.time()
        settings = EvalSettings(n=unit.n, n_revival=min(N_REVIVAL, unit.n), seed=unit.eval_seed, sampler=sampler,
                                quality=unit.quality, paraphrases=False, unsafe=False)
        run_bench([unit.method], unit.concepts, unit.model, folder, presets={unit.method: unit.preset},
                  data=unit.data, eval_settings=settings, seed=unit.seed, kept_classes=unit.kept, detector=False,
                  isolate=isolate, progress=progress, echo=echo, title=f"protocol unit: {unit.label}", **bench_kwargs)
        metrics = json.loads((folder / unit.method / "eval" / "metrics.json").read_text())
        cost = json.loads((folder / unit.method / "bench.json").read_text())
        record = {"format": UNIT_FORMAT, "identity": unit.identity(), "unit": asdict(unit),
                  "result": unit_scores(metrics, cost, unit.method),
                  "seconds": round(time.perf_counter() - t, 2), "resumed": started,
                  "process": {"pid": os.getpid(), "threads": torch.get_num_threads(),
                              "device": str(resolve_device(bench_kwargs.get("device", "auto")))},
                  "started": t_wall, "finished": time.time()}
        atomic_write_text(folder / "unit.json", json.dumps(record, indent=2, default=str))
    return record


def run_units(units: list[Unit], out: Path, *, workers: int = 1, context: str | None = None,
              echo: Callable[[str], None] = print, **unit_kwargs) -> list[dict]:
    """Run every unfinished unit: in this process (workers=1; unit_kwargs go to run_unit) or `workers` at a
    time, each in its own single-thread process (context: "module:function" returning run_unit's keyword
    arguments in that process; default none, i.e. the model's own benchmark and classifier). A unit
    that fails is named at the end; the others go on. Returns the finished units' records, in order."""
    out = Path(out)
    todo = [u for u in units if unit_result(u, out) is None]
    echo(f"protocol: {len(units) - len(todo)} of {len(units)} unit(s) finished, {len(todo)} to run"
         + (f" ({workers} at a time)" if todo and workers > 1 else ""))
    failed: list[str] = []
    if workers <= 1:
        for i, u in enumerate(todo, 1):
            echo(f"protocol: [{i}/{len(todo)}] {u.label}")
            record = run_unit(u, out, echo=echo, **unit_kwargs)
            echo(f"protocol: {u.label}: {_said(record)}")
    else:
        failed = _run_in_processes(todo, out, workers, context, echo)
    if failed:
        raise ProtocolRunError(f"{len(failed)} unit(s) failed (each folder's unit.log says why; run again to "
                               f"retry them): {'; '.join(failed)}")
    return [unit_result(u, out) for u in units]


def _said(record: dict) -> str:
    r = record["result"]
    return (f"Total Acc {r['total_acc']:.3f}, kept {r['kept_acc']:.3f}, fit {r['fit_s'] or 0:.1f} s, "
            f"unit {record['seconds']:.0f} s")


def _run_in_processes(todo: list[Unit], out: Path, workers: int, context: str | None,
                      echo: Callable[[str], None]) -> list[str]:
    queue, running, failed = list(todo), {}, []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SCULPT_PROGRESS": "lines"}

    def stop(signum, frame):  # `kill` of the runner stops its workers too (the finally below)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        while queue or running:
            while queue and len(running) < workers:
                u = queue.pop(0)
                folder = out / u.folder
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(folder / "unit-spec.json", json.dumps(asdict(u), indent=2, default=str))
                with open(folder / "unit.log", "ab") as log:
                    args = [sys.executable, "-m", "sculpt.bench_protocol", str(folder / "unit-spec.json"), str(out)]
                    running[subprocess.Popen(args + ([context] if context else []), stdout=log,
                                             stderr=subprocess.STDOUT, env=env)] = u
                echo(f"protocol: started {u.label} ({len(todo) - len(queue)}/{len(todo)})")
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                u = running.pop(proc)
                record = unit_result(u, out) if proc.returncode == 0 else None
                if record is None:
                    failed.append(f"{u.label} (exit {proc.returncode}, {out / u.folder / 'unit.log'})")
                    echo(f"protocol: {u.label}: FAILED (exit {proc.returncode})")
                else:
                    echo(f"protocol: {u.label}: {_said(record)}")
    finally:  # interrupted: stop the children; their units restart or resume next time
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return failed


def _import(target: str):
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker(argv: list[str]) -> int:
    """`python -m sculpt.bench_protocol UNIT.json OUT [CONTEXT]`: one unit in a fresh single-thread process."""
    import torch

    torch.set_num_threads(1)
    unit = Unit(**json.loads(Path(argv[0]).read_text()))
    kwargs = _import(argv[2])() if len(argv) > 2 else {}
    run_unit(unit, Path(argv[1]), **kwargs)
    return 0


# -- the protocol ----------------------------------------------------------------------------------


def _finished(units: list[Unit], out: Path) -> list[dict]:
    return [r for r in (unit_result(u, out) for u in units) if r is not None]


def select_settings(p: Protocol, records: list[dict], methods: list[str]) -> dict[str, str]:
    """The selection rule on each method's dev results: method -> the chosen setting ("s<k>"). Every
    setting of the method's grid must be finished (the rule is applied to the whole grid, never part)."""
    chosen = {}
    for m in methods:
        dev = [r for r in records if r["unit"]["phase"] == "dev" and r["unit"]["method"] == m]
        if len(dev) != len(p.settings(m)):
            raise ProtocolRunError(f"{m}: {len(dev)} of {len(p.settings(m))} development settings finished; run "
                                   "--phase dev (or all) first")
        pick = select([{**r["result"], "setting": r["unit"]["setting"]} for r in dev], p.max_dev_total_acc)
        chosen[m] = pick["setting"]
    return chosen


def run_protocol(protocol: Protocol | str | Path, out: str | Path, *, world: World | None = None,
                 methods: list[str] | None = None, phase: str = "all", workers: int = 1, quick: bool = False,
                 context: str | None = None, command: str | None = None, echo: Callable[[str], None] = print,
                 **unit_kwargs) -> dict:
    """Run a protocol's phases (dev: every setting on the development list; test: each method's paper
    defaults and its selected setting on the test targets, every seed), resumably, and write
    out/protocol.json, protocol.md, dev_pareto.png and report.html. Returns protocol.json's content.

    world: model, presets, data, classes and concept specs (default: the emoji world).
    methods: a subset of the protocol's (default: all, in the file's order).
    workers, context: see run_units. quick: a smoke run (step counts / 10, at most 4 pictures per
    prompt; numbers mean nothing). unit_kwargs: passed to run_unit (in-process units only).
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, not {phase!r}")
    p = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    out = Path(out)
    world = world or emoji_world(p)
    methods = methods or list(p.grids)
    unknown = [m for m in methods if m not in p.grids]
    if unknown:
        raise ProtocolRunError(f"not in the protocol's grids: {', '.join(unknown)} (it has {', '.join(p.grids)})")
    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    run = dict(workers=workers, context=context, echo=echo, **unit_kwargs)
    if phase == "report":
        echo("protocol: report only, from the finished units")
    if phase in ("dev", "all"):
        dev = dev_units(p, world, methods, quick)
        echo(f"protocol: development phase, {len(dev)} unit(s): {len(methods)} method(s) x {p.settings_per_method} "
             f"settings on {', '.join(p.dev_concepts)}")
        run_units(dev, out, **run)
    if phase in ("test", "all"):
        selected = select_settings(p, _finished(dev_units(p, world, methods, quick), out), methods)
        test = test_units(p, world, selected, quick)
        echo(f"protocol: test phase, {len(test)} unit(s): paper defaults and tuned x {len(p.seeds)} seed(s) on "
             f"{len(p.test_concepts)} concept(s); selected: " + ", ".join(f"{m} {s}" for m, s in selected.items()))
        run_units(test, out, **run)
    # The report covers every method of the protocol finished in `out`, whichever call ran it.
    records = _finished(dev_units(p, world, list(p.grids), quick), out)
    complete = [m for m in p.grids if sum(r["unit"]["method"] == m for r in records) == len(p.settings(m))]
    selected = select_settings(p, records, complete)
    records += _finished(test_units(p, world, selected, quick), out)
    summary = summarize(p, records, selected, same_as_defaults=tuned_is_default(p, world, selected, quick))
    summary["command"] = command
    summary["wall_s_this_call"] = round(time.perf_counter() - t, 1)
    write_protocol_report(out, p, summary, quick=quick)
    echo(f"protocol: wrote {out / 'protocol.md'}, {out / 'protocol.json'}, {out / 'report.html'}")
    return summary


# -- the tables ------------------------------------------------------------------------------------


def _per_seed_class(records: list[dict], key: str) -> dict[tuple[int, str], float]:
    return {(r["unit"]["seed"], c): v for r in records for c, v in r["result"][key].items() if v is not None}


def _interval(values: dict, rounds: int) -> list[float] | None:
    return list(bootstrap_interval(values, rounds=rounds)) if values else None


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


SCORED = {"total_acc": "per_concept", "kept_acc": "per_kept", "coherence": "per_coherence"}


def summarize(p: Protocol, records: list[dict], selected: dict[str, str], same_as_defaults: set[str] = frozenset(),
              rounds: int = 2000) -> dict[str, Any]:
    """From the finished units' records: per method its dev settings (scores, fit seconds) and the
    selected one; the test table, the original model's reference row first, then one "paper defaults"
    and one "tuned" row per method, each score a mean with its 95% bootstrap interval over seeds and
    classes (protocol.bootstrap_interval); the paired differences of every row against the best
    baseline's tuned row (the same seeds and classes, differenced per (seed, class), then
    bootstrapped); the compute spent. same_as_defaults:
    the methods whose selected setting is their preset (their tuned row is their paper-defaults row);
    a tuned row whose units are not finished yet is left out."""
    methods = list(dict.fromkeys(r["unit"]["method"] for r in records))
    dev: dict[str, Any] = {}
    for m in methods:
        units = sorted((r for r in records if r["unit"]["phase"] == "dev" and r["unit"]["method"] == m),
                       key=lambda r: int(r["unit"]["setting"][1:]))
        if not units:
            continue
        grid = p.settings(m) if m in p.grids else []
        dev[m] = {"selected": selected.get(m), "tried": len(units),
                  "fit_s": round(sum(r["result"]["fit_s"] or 0 for r in units), 1),
                  "settings": [{"setting": r["unit"]["setting"],
                                "values": grid[int(r["unit"]["setting"][1:]) - 1] if grid else None,
                                **{k: r["result"][k] for k in ("total_acc", "kept_acc", "coherence", "fit_s")},
                                "device": _device(r)}
                               for r in units]}
    rows, by_row = [], {}
    for m in methods:
        test = [r for r in records if r["unit"]["phase"] == "test" and r["unit"]["method"] == m]
        if not test:
            continue
        chosen = selected.get(m)
        tuned_setting = "default" if m in same_as_defaults else chosen
        for row, setting in (("paper defaults", "default"), ("tuned", tuned_setting)):
            rs = [r for r in test if r["unit"]["setting"] == setting]
            if not rs:
                continue
            by_row[(m, row)] = {k: _per_seed_class(rs, per) for k, per in SCORED.items()}
            rows.append({"method": m, "row": row, "setting": chosen if row == "tuned" else "default",
                         "same_as_defaults": row == "tuned" and setting == "default",
                         "seeds": sorted(r["unit"]["seed"] for r in rs),
                         **{k: _interval(by_row[(m, row)][k], rounds) for k in SCORED},
                         "clip": _mean([r["result"]["clip"] for r in rs]), "fid": _mean([r["result"]["fid"] for r in rs]),
                         "fit_s_per_run": _mean([r["result"]["fit_s"] for r in rs]),
                         "settings_tried": dev.get(m, {}).get("tried", 0), "tuning_fit_s": dev.get(m, {}).get("fit_s")})
    reference = _original_row(records, rounds)
    best = best_baseline(p, rows)
    differences = []
    if best is not None:
        ref = by_row[(best, "tuned")]
        for r in rows:
            if (r["method"], r["row"]) == (best, "tuned"):
                continue
            mine = by_row[(r["method"], r["row"])]
            differences.append({"method": r["method"], "row": r["row"], **{
                k: _interval({key: v - ref[k][key] for key, v in mine[k].items() if key in ref[k]}, rounds)
                for k in ("total_acc", "kept_acc")}})
    unit_s = {ph: round(sum(r["seconds"] for r in records if r["unit"]["phase"] == ph), 1) for ph in ("dev", "test")}
    by_device: dict[str, dict[str, float]] = {}
    for r in records:
        d = by_device.setdefault(_device(r), {"units": 0, "unit_s": 0.0})
        d["units"] += 1
        d["unit_s"] = round(d["unit_s"] + r["seconds"], 1)
    fit_s = {ph: round(sum(r["result"]["fit_s"] or 0 for r in records if r["unit"]["phase"] == ph), 1)
             for ph in ("dev", "test")}
    return {"protocol": p.model_dump(mode="json"), "dev": dev, "selected": selected,
            "test": ([reference] if reference else []) + rows,
            "best_baseline": best, "differences": differences,
            "compute": {"units": len(records), "unit_s": unit_s, "fit_s": fit_s,
                        "total_unit_s": round(sum(unit_s.values()), 1), "by_device": by_device,
                        "resumed_units": sum(bool(r.get("resumed")) for r in records)},
            "units": [{"phase": r["unit"]["phase"], "method": r["unit"]["method"], "setting": r["unit"]["setting"],
                       "seed": r["unit"]["seed"], "seconds": r["seconds"], "resumed": r.get("resumed", False),
                       **{k: v for k, v in r["result"].items()}} for r in records]}


ORIGINAL = "original model"


def _original_row(records: list[dict], rounds: int) -> dict | None:
    """The reference row: the original model on the test targets and test-kept classes, per seed from
    the first test unit of that seed that kept its base scores (every unit of a seed evaluates the
    original model on the same pictures), with the same intervals as the methods' rows."""
    per_seed: dict[int, dict] = {}
    for r in records:
        if r["unit"]["phase"] == "test" and "base" in r["result"]:
            per_seed.setdefault(r["unit"]["seed"], {"unit": r["unit"], "result": r["result"]["base"]})
    if not per_seed:
        return None
    rs = [per_seed[s] for s in sorted(per_seed)]
    return {"method": ORIGINAL, "row": "reference", "setting": "-", "same_as_defaults": False,
            "seeds": sorted(per_seed),
            **{k: _interval(_per_seed_class(rs, per), rounds) for k, per in SCORED.items()},
            "clip": _mean([r["result"]["clip"] for r in rs]), "fid": _mean([r["result"]["fid"] for r in rs]),
            "fit_s_per_run": None, "settings_tried": None, "tuning_fit_s": None}


def _device(record: dict) -> str:
    """Where a unit ran ("cpu", "cuda"); units written before devices were recorded ran on the CPU."""
    return record.get("process", {}).get("device", "cpu")


def best_baseline(p: Protocol, rows: list[dict]) -> str | None:
    """The baseline (any method but the paper's) whose tuned row the protocol's own rule picks on the
    test means: Total Acc at most max_dev_total_acc, then highest kept accuracy, then coherence; if
    none forgets that well, the lowest Total Acc."""
    tuned = [{"method": r["method"], "total_acc": r["total_acc"][0], "kept_acc": r["kept_acc"][0],
              "coherence": (r["coherence"] or [None])[0]}
             for r in rows if r["row"] == "tuned" and r["method"] != PAPER_METHOD]
    return select(tuned, p.max_dev_total_acc)["method"] if tuned else None


def _ci(v: list[float] | None) -> str:
    return "-" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def _diff(v: list[float] | None) -> str:
    return "-" if v is None else f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def protocol_tables(p: Protocol, summary: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """The report's tables as (title, header, rows, note), for Markdown and HTML alike."""
    tables = []
    if summary["test"]:
        tables.append((
            f"Test table: {len(p.test_concepts)} test targets, seeds {p.seeds}, {p.n_test} pictures per prompt",
            ["method", "row", "setting", "seeds", "Total Acc ↓ [95%]", "kept acc ↑ [95%]", "coherence ↑ [95%]",
             "CLIP ↑", "FID ↓", "settings tried", "tuning fit s", "fit s / run"],
            [[r["method"], r["row"], r["setting"] + (" (= defaults)" if r["same_as_defaults"] else ""),
              ", ".join(map(str, r["seeds"])), _ci(r["total_acc"]), _ci(r["kept_acc"]), _ci(r["coherence"]), _num(r["clip"], ".2f"),
              _num(r["fid"], ".2f"), _num(r["settings_tried"], "d"), _num(r["tuning_fit_s"], ".1f"),
              _num(r["fit_s_per_run"], ".1f")] for r in summary["test"]],
            "seeds: the training seeds finished (a row with fewer than the protocol's is partial). "
            "Means over seeds and classes with 95% percentile bootstrap intervals (seeds and classes resampled "
            "independently, 2000 rounds). Total Acc: accuracy on the erased test targets; kept acc: the test-kept "
            "classes; coherence: share of an erased target's pictures classified into its superclass. paper "
            "defaults: the method's bench preset unchanged; tuned: the setting the selection rule picked on the "
            "development list; original model: the unerased model, same prompts and picture seeds (the ceiling for "
            "kept acc). tuning fit s: fit seconds of all its development settings; fit s / run: one test run (mean over "
            "seeds)."))
    if summary["differences"]:
        tables.append((
            f"Paired differences against the best baseline ({summary['best_baseline']}, tuned)",
            ["method", "row", "Δ Total Acc [95%]", "Δ kept acc [95%]"],
            [[d["method"], d["row"], _diff(d["total_acc"]), _diff(d["kept_acc"])] for d in summary["differences"]],
            "Row minus the best baseline's tuned row on the same (seed, class) pairs, bootstrapped over seeds and "
            "classes. The best baseline is the one whose tuned row the protocol's selection rule picks on the test "
            "means. An interval that holds 0 is no difference."))
    if summary["dev"]:
        tables.append((
            f"Development: {', '.join(p.dev_concepts)}, seed {p.seeds[0]}, {p.n_dev} pictures per prompt",
            ["method", "setting", "values", "dev Total Acc ↓", "dev kept acc ↑", "coherence ↑", "fit s", "device",
             "selected"],
            [[m, s["setting"], ", ".join(f"{k}={v}" for k, v in (s["values"] or {}).items()), _num(s["total_acc"]),
              _num(s["kept_acc"]), _num(s["coherence"]), _num(s["fit_s"], ".1f"), s.get("device", "cpu"),
              "✔" if s["setting"] == d["selected"] else ""] for m, d in summary["dev"].items() for s in d["settings"]],
            f"Selection rule (fixed in the protocol): highest dev-kept accuracy among the settings with dev Total "
            f"Acc ≤ {p.max_dev_total_acc}, ties broken on coherence; if none qualifies, the lowest dev Total Acc."))
    c = summary["compute"]
    tables.append((
        "Compute", ["what", "seconds"],
        [["development units (process seconds)", _num(c["unit_s"]["dev"], ".0f")],
         ["test units (process seconds)", _num(c["unit_s"]["test"], ".0f")],
         ["all units", _num(c["total_unit_s"], ".0f")],
         ["of which fit (dev / test)", f"{c['fit_s']['dev']:.0f} / {c['fit_s']['test']:.0f}"],
         *[[f"on {d} ({v['units']} units, process seconds)", _num(v["unit_s"], ".0f")]
           for d, v in sorted(c.get("by_device", {}).items())],
         ["this call's wall clock", _num(summary.get("wall_s_this_call"), ".0f")]],
        f"{c['units']} unit(s) finished; process seconds: each unit's erase + evaluation call, summed over units "
        f"(with N workers the wall clock is about 1/N of it). A unit resumed after an interruption counts only its "
        f"last part ({c['resumed_units']} resumed). Seconds on different devices do not compare: fit s in the "
        f"development table compares settings of one method on one device."))
    return tables


def write_protocol_report(out: Path, p: Protocol, summary: dict, quick: bool = False) -> None:
    """out/protocol.json, out/protocol.md, out/dev_pareto.png (when there are dev results) and
    out/report.html (the tables and the plot, self-contained)."""
    from html import escape

    out = Path(out)
    atomic_write_text(out / "protocol.json", json.dumps(summary, indent=2, default=str))
    tables = protocol_tables(p, summary)
    head = ["# sculpt bench --protocol", ""]
    if quick:
        head += ["**Smoke run (--quick): step counts / 10, at most 4 pictures per prompt; the numbers mean nothing.**", ""]
    if summary.get("command"):
        head += ["Produced by:", "", f"    {summary['command']}", ""]
    md = list(head)
    for title, header, rows, note in tables:
        md += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        md += ["| " + " | ".join(r) + " |" for r in rows] + ["", note, ""]
    plot = dev_pareto_plot(summary, out / "dev_pareto.png", p.max_dev_total_acc) if summary["dev"] else None
    if plot:
        md += ["## Development Pareto plot", "", "![dev Pareto plot](dev_pareto.png)", ""]
    atomic_write_text(out / "protocol.md", "\n".join(md))
    page = ["<!doctype html><meta charset=utf-8><title>sculpt bench --protocol</title>",
            "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}.note{color:#555;font-size:13px}</style>",
            "<h1>sculpt bench --protocol</h1>"]
    if quick:
        page.append("<p><b>Smoke run (--quick): the numbers mean nothing.</b></p>")
    if summary.get("command"):
        page.append(f"<p>Produced by: <code>{escape(summary['command'])}</code></p>")
    for title, header, rows, note in tables:
        page.append(f"<h2>{escape(title)}</h2><table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
        page += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows]
        page.append(f"</table><p class=note>{escape(note)}</p>")
    if plot:
        data = base64.b64encode(plot.read_bytes()).decode()
        page.append(f"<h2>Development Pareto plot</h2><img alt='dev Pareto plot' src='data:image/png;base64,{data}'>")
    atomic_write_text(out / "report.html", "\n".join(page))


def dev_pareto_plot(summary: dict, path: Path, max_total_acc: float) -> Path:
    """Kept accuracy against Total Acc on the development list, every setting of every method (one
    colour per method), each method's selected setting ringed, the rule's Total Acc bar dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110)
    for i, (m, d) in enumerate(summary["dev"].items()):
        colour = plt.get_cmap("tab10")(i % 10)
        pts = [(s["total_acc"], s["kept_acc"], s["setting"] == d["selected"]) for s in d["settings"]]
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], color=colour, label=m, s=28, alpha=0.85)
        ax.scatter([x for x, _, sel in pts if sel], [y for _, y, sel in pts if sel], s=150, facecolors="none",
                   edgecolors=colour, linewidths=2)
    ax.axvline(max_total_acc, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("dev Total Acc ↓ (erased concepts still recognised)")
    ax.set_ylabel("dev kept accuracy ↑")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Development settings (ringed: selected; dashed: the rule's Total Acc bar)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
