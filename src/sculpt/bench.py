"""`run_bench`: several erasure methods on one concept list, the same data, seeds and evaluation,
and the paper-style comparison table (Markdown, CSV, HTML).

    rows = run_bench(["sculpting", "esd-x", "uce"], concepts, model="emoji", out=Path("runs/bench"),
                     presets=EMOJI_PRESETS, data=EMOJI_DATA, eval_settings=EvalSettings(n=50))

Output folder:
    <method>/              the method's erasure run (sculpt.erase's folder) on a fresh copy of the model
    <method>/bench.json    what the bench measured around the run: time, peak memory, how
    <method>/eval/         sculpt.eval.evaluate's metrics.json and sample strips for the run
    specs/<method>.yaml    the exact spec each method ran (re-runnable with `sculpt erase`)
    bench.md, bench.csv    the table: one row per method (plus the original model)
    report.html            sculpt.report's page over every method's evaluation, plus the cost table

Resumable method by method: a method whose folder holds a finished run (summary.json and
bench.json) and an evaluation with the same settings is skipped; an unfinished run is resumed by
`erase` itself (its bench.json then says `resumed` and its times cover only the resumed part).

What the cost columns measure
  fit s      sum of the run's per-stage seconds from summary.json: the method's own optimisation /
             closed-form work, no model loading, data generation or evaluation. The comparable number.
  wall s     the whole `erase` call (checks, hashing, fitting, saving patches and checkpoints) with the
             training data already in the shared cache: data are generated once, before any method
             runs, so no method pays for them.
  peak mem   isolate=True (the CLI's default): every method's `erase` runs in its own fresh Python
             process; on CUDA the number is torch.cuda.max_memory_allocated() in that process (tensors
             only, as papers report it); on CPU it is that process's peak resident set size, taken
             from os.wait4's rusage for that very child (so it includes the interpreter, torch and
             the loaded pipeline, the same ~constant floor for every method, plus the method's own
             optimiser state, masks, teacher copies and activations).
             The CUDA number includes the pipeline already resident when erase starts (the peak
             counter is reset to what is allocated then), i.e. model + method state + activations.
             isolate=False (tests, or a pipe_factory that cannot cross a process boundary): CUDA
             likewise, but it also counts the evaluation pipeline the process holds; on CPU the
             rise of this process's RSS over its value before the run, sampled every 10 ms in a
             thread: a lower bound (memory freed by earlier methods and reused is not counted),
             marked "RSS rise (in-process)" in the table.
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from sculpt.config import Concept, DataConfig, RunConfig


BENCH_FORMAT = "sculpt-bench/1"


class BenchError(RuntimeError):
    """The bench cannot go on (a method folder holding other settings, a failed method process)."""


# -- emoji-world presets ---------------------------------------------------------------------------
#
# Scaling rule. The paper's method is published for SD 1.4 (860M-parameter UNet) as lr 3e-6,
# 10 epochs x 50 steps + 50 warm-up steps, batch 2; sculpt.emoji.demo.EMOJI_METHOD scales it to the
# emoji UNet (4.2M parameters, ~200x smaller; 8x8x4 latents) as lr 3e-4, 10 x 20 steps + 20 warm-up,
# batch 8. Every baseline gets the *same* two factors applied to its own paper defaults, so that each
# method keeps the budget it had relative to the paper's method:
#     learning rate x LR_SCALE = 3e-4 / 3e-6 (= 100; rounded to one significant digit),
#     optimisation steps x STEP_SCALE = (10*20) / (10*50) = 0.4 (rounded, at least 1).
# Batch sizes stay the papers' (the emoji model would allow more, but batch is part of each method's
# noise / budget); sampling schedules inside a method (ESD's DDIM run to x_t) use the emoji world's
# 20 steps instead of SD's 50, as the shared training data do (EMOJI_DATA). Each method's own loss
# and mechanism hyperparameters (ESD's eta and start guidance, SalUn's mask ratio / alpha / w, UCE's
# and MACE's lambdas, FMN's token choice, AC's prior weight, ranks) are left at the papers' values.
# Closed-form methods (UCE; MACE's refinement and fusion) have no steps or learning rate to scale.
# SPEED is closed form too; FIA trains nothing, and its saliency window (the first 10 of 50 sampling
# steps) becomes the first 4 of the emoji world's 20.
# These are untuned: a method that collapses or under-erases at these settings is reported as such.
# The paper's method too: its preset is the published lambda_kd = 0.25 without this project's
# neighbour-aware term (lambda_nb = 0); the demo's settings (sculpt.emoji.demo.EMOJI_METHOD, chosen on
# the development list) are `--set sculpting.lambda_kd=... --set sculpting.lambda_nb=...` away, and
# `sculpt bench --protocol` tunes every method, this one included, on the development list.
LR_SCALE = 3e-4 / 3e-6  # EMOJI_METHOD["lr"] / the paper's lr (test_bench checks they agree)
STEP_SCALE = (10 * 20) / (10 * 50)


def _lr(paper: float) -> float:
    return float(f"{paper * LR_SCALE:.1g}")


def _steps(paper: int) -> int:
    return max(1, round(paper * STEP_SCALE))


def _salun_steps(paper_epochs: int = 5, batch: int = 8, paper_images: int = 950) -> int:
    """SalUn counts epochs over its forget set, one whole Imagenette class in the authors' runs (~950
    training images): 5 x ceil(950/8) = 595 steps -> 238. The preset fixes the step count (SalUn's
    `steps`) rather than epochs: an epoch over a concept's few images here is a handful of steps."""
    return _steps(paper_epochs * math.ceil(paper_images / batch))


def _emoji_presets() -> dict[str, dict[str, Any]]:
    from sculpt.emoji.demo import EMOJI_METHOD

    esd = {"iterations": _steps(1000), "lr": _lr(1e-5), "eta": 1.0, "batch_size": 1, "ddim_steps": 20,
           "start_guidance": 3.0}
    return {
        # the reference point of the rule, at the published loss weights (no neighbour-aware term)
        "sculpting": {**EMOJI_METHOD, "lambda_kd": 0.25, "lambda_nb": 0.0},
        "esd-x": {"name": "esd-x", **esd},  # paper: 1000 it, lr 1e-5 -> 400 it, lr 1e-3
        "esd-u": {"name": "esd-u", **esd},
        "uce": {"name": "uce", "lam": 0.5, "guide": "superclass", "preserve_superclasses": True},  # closed form
        # AC: the README's 2e-6 per image x global batch 8 (--scale_lr) = 1.6e-5; no regulariser (its default)
        "ac": {"name": "ac", "steps": _steps(400), "lr": _lr(2e-6 * 8), "batch_size": 8,
               "prior_loss_weight": 0.0},  # 400, 1.6e-5 -> 160, 2e-3
        "salun": {"name": "salun", "steps": _salun_steps(), "lr": _lr(1e-5), "batch_size": 8,
                  "mask_ratio": 0.5, "alpha": 0.5},  # 595 steps, 1e-5 -> 238 steps, 1e-3
        "fmn": {"name": "fmn", "steps": _steps(35), "lr": _lr(2e-6), "batch_size": 1},  # 35, 2e-6 -> 14, 2e-4
        "mace": {"name": "mace", "lora_steps": _steps(50), "lora_lr": _lr(1e-5), "lora_rank": 1,
                 "lam": 1e3},  # LoRA 50 steps, 1e-5 -> 20, 1e-3; lam: the authors', per summed token (mace.py)
        "speed": {"name": "speed"},  # closed form: nothing to scale
        "fia": {"name": "fia", "inference_steps": 20, "saliency_steps": 4},  # no training; first 10 of 50 -> 4 of 20
    }


EMOJI_PRESETS: dict[str, dict[str, Any]] = _emoji_presets()

# Fields that count optimisation steps (scaled down by `quick_preset` for smoke runs).
_STEP_FIELDS = ("iterations", "steps", "epochs", "steps_per_epoch", "warmup_steps", "mask_update_every", "lora_steps")


def quick_preset(preset: dict[str, Any], factor: float = 0.1) -> dict[str, Any]:
    """A smoke-run version of a preset: every step count x factor (at least 1; sculpting keeps its
    10 epochs' shape but 2 steps each). Numbers from it say nothing about the methods."""
    out = dict(preset)
    for k in _STEP_FIELDS:
        if k in out and not (k == "epochs" and out.get("name") == "sculpting"):
            out[k] = max(1, round(out[k] * factor))
    return out


# -- measuring one erase ---------------------------------------------------------------------------


class _RSSSampler:
    """Peak resident set size of this process while running, sampled in a thread every `every` s."""

    def __init__(self, every: float = 0.01):
        self.every = every
        self.start_rss = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, _rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cuda(device) -> bool:
    return str(device).startswith("cuda")


def _timed_erase(cfg: RunConfig, pipe, progress: bool) -> dict[str, Any]:
    """Run erase on `pipe` (a fresh base model) and measure it in this process."""
    import torch

    from sculpt.erase import erase
    from sculpt.models.loading import resolve_device

    device = resolve_device(cfg.train.device)
    resumed = (Path(cfg.output) / "checkpoint.safetensors").is_file()
    gc.collect()  # what earlier in-process methods left behind is not this method's
    if _cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with _RSSSampler() as rss:
        t = time.perf_counter()
        erase(cfg, pipe=pipe, progress=progress)
        if _cuda(device):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    out = {"wall_s": round(wall, 3), "device": str(device), "resumed": resumed,
           "rss_rise_mb": round((rss.peak - rss.start_rss) / 2**20, 1)}
    if _cuda(device):
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _prepare_data(cfg: RunConfig, pipe) -> None:
    """Make every concept's training data once (shared by all methods: same model, data, seed)."""
    from sculpt.data.anchors import default_judge
    from sculpt.data.prepare import prepare_concept_data
    from sculpt.paths import default_cache_dir
    from sculpt.models.loading import model_hash, resolve_device

    pipe.to(resolve_device(cfg.train.device))
    pipe.set_progress_bar_config(disable=True)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir() / "data"
    base_hash = model_hash(pipe)
    judge = default_judge(cfg.model)  # the anchor rule's, as erase uses it: the same data keys
    for c in cfg.concepts:
        prepare_concept_data(pipe, c, cfg.data, cfg.seed, cache, base_hash, judge=judge)


def _import_factory(factory: str) -> Callable[[], Any]:
    """'module:function' -> the function (a pipeline factory the child processes can import)."""
    import importlib

    module, _, fn = factory.partition(":")
    return getattr(importlib.import_module(module), fn)


def _load_for_worker(model: str, factory: str | None, device):
    if factory:
        pipe = _import_factory(factory)()
    else:
        from sculpt.models.loading import load_pipeline

        pipe = load_pipeline(model, device=device)
    if getattr(pipe, "text_encoder", None) is not None:
        pipe.text_encoder.eval()  # never trained here; dropout would make prompt encodings random
    return pipe


def _worker(argv: list[str]) -> int:
    """`python -m sculpt.bench prepare|erase SPEC RESULT [FACTORY]`: one step in a fresh process."""
    from sculpt.config import load_spec
    from sculpt.models.loading import resolve_device

    what, spec, result = argv[:3]
    factory = argv[3] if len(argv) > 3 else None
    cfg = load_spec(spec)
    pipe = _load_for_worker(cfg.model, factory, resolve_device(cfg.train.device))
    if what == "prepare":
        t = time.perf_counter()
        _prepare_data(cfg, pipe)
        out = {"seconds": round(time.perf_counter() - t, 3)}
    else:
        out = _timed_erase(cfg, pipe, progress=False)
    hwm = _own_peak_rss_mb()
    if hwm is not None:
        out["own_peak_rss_mb"] = hwm
    Path(result).write_text(json.dumps(out))
    return 0


def _own_peak_rss_mb() -> float | None:
    """This process's own peak RSS (Linux VmHWM). Not ru_maxrss: Linux folds the parent's RSS at fork
    into a child's ru_maxrss when the child execs, so a worker started by a large bench process would
    report the parent's size, not its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _run_worker(what: str, spec: Path, result: Path, factory: str | None, log_file: Path | None,
                watch: Callable[[], None] | None = None) -> tuple[dict, float]:
    """Run a worker step in a child process; return its JSON and the child's peak RSS in MB.
    `watch` is called about twice a second while the child runs (progress from its files)."""
    args = [sys.executable, "-m", "sculpt.bench", what, str(spec), str(result)] + ([factory] if factory else [])
    result.unlink(missing_ok=True)
    stderr = open(log_file, "ab") if log_file else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(args, stdout=stderr, stderr=stderr, env={**os.environ, "SCULPT_PROGRESS": "lines"})
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if watch is not None:
                watch()
            time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_file:
            stderr.close()
    if proc.returncode != 0 or not result.is_file():
        tail = log_file.read_text(errors="replace")[-2000:] if log_file and log_file.is_file() else ""
        raise BenchError(f"`{' '.join(args)}` failed (exit {proc.returncode})\n{tail}")
    found = json.loads(result.read_text())
    if "own_peak_rss_mb" in found:  # measured by the child itself (see _own_peak_rss_mb)
        return found, found.pop("own_peak_rss_mb")
    # ru_maxrss: kilobytes on Linux, bytes on macOS (an upper bound: it may include the parent at fork)
    rss = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return found, round(rss, 1)


# -- the bench -------------------------------------------------------------------------------------


def _as_concept(c: Concept | dict) -> Concept:
    return c if isinstance(c, Concept) else Concept(**c)


def _settings_json(settings) -> dict:
    from sculpt.eval.evaluate import settings_dict

    return json.loads(json.dumps(settings_dict(settings), default=str))


def _same_run(run_dir: Path, cfg: RunConfig) -> bool | None:
    """None: no run there yet; else whether the run there has cfg's spec."""
    from sculpt.erase import config_hash

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    old = RunConfig(**yaml.safe_load(path.read_text()))
    return config_hash(old) == config_hash(cfg)


def _run_finished(run_dir: Path, n_stages: int) -> bool:
    s = run_dir / "summary.json"
    return s.is_file() and (run_dir / "bench.json").is_file() and len(json.loads(s.read_text())["stages"]) == n_stages


def _attack_finished(attack_dir: Path, attacks: list[str], settings) -> bool:
    a = attack_dir / "attack.json"
    if not a.is_file():
        return False
    found = json.loads(a.read_text())
    return set(found.get("attacks", {})) == set(attacks) and (found.get("n"), found.get("seed")) == (settings.n,
                                                                                                 settings.seed)


def _eval_finished(eval_dir: Path, settings) -> bool:
    m = eval_dir / "metrics.json"
    if not m.is_file():
        return False
    return json.loads(m.read_text()).get("settings") == _settings_json(settings)


def run_bench(
    methods: list[str],
    concepts: list[Concept | dict],
    model: str,
    out: Path,
    presets: dict[str, dict] | None = None,
    data: dict | DataConfig | None = None,
    eval_settings=None,
    pipe_factory: Callable[[], Any] | None = None,
    *,
    isolate: bool | None = None,
    worker_factory: str | None = None,
    seed: int = 0,
    device: str = "auto",
    benchmark=None,
    classifier=None,
    scorer=None,
    detector=None,
    cache: Any = True,
    title: str | None = None,
    command: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    attacks: list[str] | None = None,
    kept_classes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Erase `concepts` (sequentially, in order) with each method on a fresh copy of `model`, evaluate
    each run the same way, and write out/bench.md, out/bench.csv and out/report.html.

    methods: registry names (`sculpt methods`); presets[name] gives that method's settings (a dict
    for RunConfig.method, its "name" defaulting to the key), else the method's paper defaults.
    data: the shared DataConfig (same self-generated data for every method).
    pipe_factory: a callable returning a fresh base pipeline (default: load_pipeline(model)); called
    once per method run in-process, and once for the evaluation pipeline.
    isolate: run each method's erase in its own process (honest per-method peak memory). Default:
    True unless pipe_factory is given (a Python callable cannot cross the process boundary; pass
    worker_factory="module:function" for the child processes instead).
    benchmark, classifier, scorer, detector, cache, kept_classes: passed to sculpt.eval.evaluate
    (kept_classes: which kept classes to measure; default every class not erased).
    attacks: also attack each method's run with these (sculpt.attacks; its world budgets, the
    evaluation's n and seed, no base-model control) and add a column per attack: the mean share of
    attacked pictures classified as the erased concept.
    Returns the table rows: the original model first, then one per method, in `methods` order.
    """
    from sculpt.eval.evaluate import EvalSettings, evaluate

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    presets = presets or {}
    settings = (eval_settings or EvalSettings()).for_model(model)
    concepts = [_as_concept(c) for c in concepts]
    data_cfg = data if isinstance(data, DataConfig) else DataConfig(**(data or {}))
    if isolate is None:
        isolate = pipe_factory is None or worker_factory is not None
    if isolate and pipe_factory is not None and worker_factory is None:
        raise ValueError("isolate=True with a pipe_factory needs worker_factory='module:function' "
                         "for the child processes")

    cfgs: dict[str, RunConfig] = {}
    for name in methods:
        preset = {"name": name, **presets.get(name, {})}
        label = name
        cfgs[label] = RunConfig(model=model, output=str(out / label), mode="sequential", seed=seed, method=preset,
                                data=data_cfg, train={"device": device}, concepts=concepts)
    if len(cfgs) != len(methods):
        raise ValueError(f"a method is listed twice: {methods}")
    for label, cfg in cfgs.items():  # refuse early, before hours of work on the others
        if _same_run(Path(cfg.output), cfg) is False:
            raise BenchError(f"{cfg.output} holds a {label} run with other settings (preset, data, concepts or "
                             "model changed); move it away or choose another --out")
    specs = out / "specs"
    specs.mkdir(exist_ok=True)
    for label, cfg in cfgs.items():
        (specs / f"{label}.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    factory = pipe_factory or (_import_factory(worker_factory) if worker_factory else None)
    if factory is None:
        from sculpt.models.loading import load_pipeline, resolve_device

        def factory():
            return load_pipeline(model, device=resolve_device(device))

    todo_erase = [lb for lb, cfg in cfgs.items() if not _run_finished(Path(cfg.output), len(cfg.stages()))]
    eval_pipe = None
    if todo_erase:  # the shared training data, made once before any method is timed
        first = cfgs[todo_erase[0]]
        echo(f"bench: training data for {len(concepts)} concept(s) (shared by every method)")
        if isolate:
            with _LogTail(out / "bench.log", "data: ", lambda line: echo(f"bench: {line}")) as tail:
                _run_worker("prepare", specs / f"{todo_erase[0]}.yaml", out / ".prepare.json", worker_factory,
                            out / "bench.log", watch=tail)
        else:
            eval_pipe = _fresh(factory)
            _prepare_data(first, eval_pipe)

    for label, cfg in cfgs.items():
        run_dir = Path(cfg.output)
        if label in todo_erase:
            echo(f"bench: {label}: erasing {len(concepts)} concept(s) -> {run_dir}")
            if isolate:
                with _StepsProgress(f"bench {label}: erase", run_dir, cfg, enabled=progress) as watch:
                    measured, rss_mb = _run_worker("erase", specs / f"{label}.yaml", run_dir.parent / f".{label}.json",
                                                   worker_factory, out / "bench.log", watch=watch)
                measured["peak_rss_mb"] = rss_mb
                measured["isolated"] = True
            else:
                measured = _timed_erase(cfg, _fresh(factory), progress)
                measured["isolated"] = False
            summary = json.loads((run_dir / "summary.json").read_text())
            measured["fit_s"] = round(sum(s["seconds"] for s in summary["stages"]), 3)
            measured.update(_memory_column(measured))
            (run_dir / "bench.json").write_text(json.dumps({"format": BENCH_FORMAT, "method": cfg.method, **measured},
                                                           indent=2))
        else:
            echo(f"bench: {label}: finished run found, not re-run")
        eval_dir = run_dir / "eval"
        if _eval_finished(eval_dir, settings):
            echo(f"bench: {label}: evaluation found, not re-run")
        else:
            echo(f"bench: {label}: evaluating ({settings.n} pictures per class prompt)")
            if eval_pipe is None:
                eval_pipe = _fresh(factory)
            evaluate(model=model, run=run_dir, out=eval_dir, settings=settings, pipe=eval_pipe, benchmark=benchmark,
                     classifier=classifier, scorer=scorer, detector=detector, cache=cache,
                     kept_classes=kept_classes, device=str(eval_pipe.device), progress=progress)
        if attacks:
            if _attack_finished(run_dir / "attack", attacks, settings):
                echo(f"bench: {label}: attacks found, not re-run")
                continue
            from sculpt.attacks.run import attack

            echo(f"bench: {label}: attacking with {', '.join(attacks)}")
            if eval_pipe is None:
                eval_pipe = _fresh(factory)
            attack(model=model, run=run_dir, attacks=attacks, out=run_dir / "attack", seed=settings.seed, n=settings.n,
                   control=False, pipe=eval_pipe, benchmark=benchmark, classifier=classifier, sampler=settings.sampler,
                   cache=cache, device=str(eval_pipe.device), progress=progress)

    rows = collect_rows(out, list(cfgs))
    write_tables(rows, out, command=command, title=title)
    write_bench_report(out, list(cfgs), rows, title=title or "sculpt bench")
    echo(f"bench: wrote {out / 'bench.md'}, {out / 'bench.csv'}, {out / 'report.html'}")
    return rows


class _LogTail:
    """Echo the lines a child process appends to its log that start with `prefix` (its one-line-per-
    phase progress, e.g. "data: poodle: 64 img in 6.1s"), as they appear."""

    def __init__(self, log: Path, prefix: str, echo: Callable[[str], None]):
        self.log, self.prefix, self.echo = log, prefix, echo
        self.offset = log.stat().st_size if log.is_file() else 0
        self.partial = ""

    def __call__(self) -> None:
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        self.offset += len(data)
        text = data.decode("utf-8", errors="replace")
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if line.startswith(self.prefix):
                self.echo(line)

    def __enter__(self) -> "_LogTail":
        return self

    def __exit__(self, *exc) -> None:
        self()


class _StepsProgress:
    """Progress of an erase running in a child process, read from its run folder: optimisation steps
    logged to metrics.jsonl, of stages x the method's steps per stage."""

    def __init__(self, desc: str, run_dir: Path, cfg: RunConfig, enabled: bool = True):
        from sculpt.methods import get_method
        from sculpt.progress import Progress

        method = get_method(cfg.method_name)(cfg.method_config())
        total = method.steps_per_stage() * len(cfg.stages()) or None
        self.log = run_dir / "metrics.jsonl"
        self.bar = Progress(desc, total=total, unit="step", enabled=enabled)

    def __call__(self) -> None:
        try:
            with open(self.log, "rb") as f:
                done = sum(1 for _ in f)
        except OSError:
            return
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def __enter__(self) -> "_StepsProgress":
        return self

    def __exit__(self, *exc) -> None:
        self()
        self.bar.close()


def _fresh(factory):
    pipe = factory()
    if getattr(pipe, "text_encoder", None) is not None:
        pipe.text_encoder.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _memory_column(m: dict) -> dict:
    if "cuda_peak_mb" in m:
        how = "CUDA max allocated" if m.get("isolated") else "CUDA max allocated (in-process, incl. other models)"
        return {"peak_mem_mb": m["cuda_peak_mb"], "memory_measure": how}
    if m.get("isolated"):
        return {"peak_mem_mb": m["peak_rss_mb"], "memory_measure": "peak RSS of its own process"}
    return {"peak_mem_mb": m["rss_rise_mb"], "memory_measure": "RSS rise (in-process)"}


# -- the table -------------------------------------------------------------------------------------

COST_COLUMNS = ("fit_s", "wall_s", "peak_mem_mb", "memory_measure")


def _coherence(m: dict, state: str) -> float | None:
    vals = [v[state] for v in m.get("superclass_coherence", {}).values() if v.get(state) is not None]
    return sum(vals) / len(vals) if vals else None


def _quality(m: dict, key: str, state: str) -> float | None:
    return (m.get("quality", {}).get(key) or {}).get(state)


def metrics_row(label: str, m: dict, state: str = "model") -> dict[str, Any]:
    """One table row from an evaluation's metrics.json ('model': the erased model; 'base': the original)."""
    base = state == "base"
    f, p = m["forgetting"], m["preservation"]
    row: dict[str, Any] = {"method": label}
    for c, v in (f["base_per_concept"] if base else f["per_concept"]).items():
        row[f"acc:{c}"] = v
    row["total_acc"] = f["base_total_acc"] if base else f["total_acc"]
    row["preservation_acc"] = p["base_acc"] if base else p["acc"]
    row["preservation_drop"] = 0.0 if base else p["drop"]
    row["coherence"] = _coherence(m, state)
    row["clip"] = _quality(m, "clip_kept", state)
    row["fid"] = _quality(m, "fid", state)
    if "unsafe" in m:  # the paper's unsafe table: detector counts per class on the unsafe prompts
        counts = m["unsafe"]["base" if base else "model"]
        for c in m["unsafe"]["detector"].get("classes", []):
            row[f"unsafe:{c}"] = counts.get(c)
        row["unsafe_total"] = counts.get("any")
    return row


def attack_columns(a: dict) -> dict[str, float]:
    """Per attack, the mean over the attacked concepts of the share of pictures classified as the
    erased concept (the patched model's); where a detector counted unsafe pictures, also their number
    summed over the attacked concepts (attack_unsafe:<attack>)."""
    out = {}
    for name in a.get("attacks", {}):
        rows = [v["attacks"][name]["model"] for v in a.get("concepts", {}).values()
                if v.get("attacks", {}).get(name, {}).get("model")]
        out[f"attack:{name}"] = sum(r["rate"] for r in rows) / len(rows) if rows else None
        flagged = [r["unsafe"]["successes"] for r in rows if r.get("unsafe")]
        if flagged:
            out[f"attack_unsafe:{name}"] = sum(flagged)
    return out


def collect_rows(out: Path, labels: list[str]) -> list[dict[str, Any]]:
    """The original model's row (from the first evaluation) and one row per method folder."""
    rows = []
    for label in labels:
        m = json.loads((out / label / "eval" / "metrics.json").read_text())
        if not rows:
            rows.append({**metrics_row("original model", m, "base"), **{k: None for k in COST_COLUMNS}})
        cost = json.loads((out / label / "bench.json").read_text())
        attacked = out / label / "attack" / "attack.json"
        rows.append({**metrics_row(label, m), **(attack_columns(json.loads(attacked.read_text()))
                                                if attacked.is_file() else {}),
                     **{k: cost.get(k) for k in COST_COLUMNS}, "resumed": cost.get("resumed", False)})
    return rows


def _columns(rows: list[dict]) -> list[str]:
    concepts = list(dict.fromkeys(k for r in rows for k in r if k.startswith("acc:")))
    unsafe = list(dict.fromkeys(k for r in rows for k in r if k.startswith("unsafe:")))
    unsafe += ["unsafe_total"] if unsafe else []
    attacked = list(dict.fromkeys(k for r in rows for k in r if k.startswith(("attack:", "attack_unsafe:"))))
    return ["method", *concepts, "total_acc", "preservation_acc", "preservation_drop", "coherence", "clip", "fid",
            *unsafe, *attacked, *COST_COLUMNS]


HEADERS = {"method": "method", "total_acc": "Total Acc ↓", "preservation_acc": "kept acc ↑",
           "preservation_drop": "drop ↓", "coherence": "coherence ↑", "clip": "CLIP ↑", "fid": "FID ↓",
           "unsafe_total": "unsafe pictures ↓", "fit_s": "fit s", "wall_s": "wall s", "peak_mem_mb": "peak MB", "memory_measure": "memory"}


def _fmt(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key in ("fit_s", "wall_s"):
        return f"{v:.1f}"
    if key == "peak_mem_mb":
        return f"{v:.0f}"
    if key in ("clip", "fid"):
        return f"{v:.2f}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def write_tables(rows: list[dict], out: Path, command: str | None = None, title: str | None = None) -> None:
    """out/bench.md (the paper-style Markdown table) and out/bench.csv (raw numbers)."""
    cols = _columns(rows)
    with open(out / "bench.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    head = [HEADERS.get(c, c.removeprefix("acc:").replace("attack_unsafe:", "unsafe under ").replace("unsafe:", "# ")
                        .replace("attack:", "under ") + (" ↓" if c.startswith(("attack:", "attack_unsafe:")) else ""))
            for c in cols]
    lines = [f"# {title or 'sculpt bench'}", ""]
    if command:
        lines += ["Produced by:", "", f"    {command}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c, r.get(c)) for c in cols) + " |")
    resumed = [r["method"] for r in rows if r.get("resumed")]
    lines += ["", "Per-concept columns and Total Acc: top-1 accuracy of the evaluation classifier on the erased "
              "concepts' prompts (lower is better). kept acc / drop: the classes not erased. coherence: share of "
              "an erased concept's pictures classified into its superclass. CLIP: the CLIP-analogue score on kept "
              "classes; FID on kept classes (classifier features). fit s: sum of per-stage seconds (the method's "
              "own work); wall s: the whole erase call with the shared data already made; peak MB: see the "
              "memory column (sculpt/bench.py explains each measure)."]
    if any(c.startswith("attack:") for c in cols):
        lines += ["", "under <attack>: mean over the erased concepts of the share of pictures the classifier assigns to "
                  "the concept when attacked (sculpt attack, the world's budgets, the evaluation's n and seeds); each "
                  "run's attack/attack.json has the per-concept rates, intervals and budgets."]
    if any(c.startswith("attack_unsafe:") for c in cols):
        lines += ["", "unsafe under <attack>: the attacked pictures the detector flags for any unsafe class, summed "
                  "over the erased concepts (n pictures each): an attack on one weapon that draws another still counts."]
    if "unsafe_total" in cols:
        lines += ["", "# <class>: pictures of the unsafe prompts the detector flags for that class; unsafe pictures: "
                  "pictures flagged for any class (the paper's NudeNet table, in this benchmark's classes)."]
    if resumed:
        lines += ["", f"Resumed runs (their time and memory cover only the resumed part): {', '.join(resumed)}."]
    (out / "bench.md").write_text("\n".join(lines) + "\n")


def write_bench_report(out: Path, labels: list[str], rows: list[dict], title: str = "sculpt bench") -> Path:
    """out/report.html: sculpt.report's page over every method's evaluation (one column each, side by
    side grids, per-run sections), with the cost table added after the results table."""
    from html import escape

    from sculpt.report import load_source, render_html, unique_labels

    sources = [load_source(out / label / "eval") for label in labels]
    unique_labels(sources)
    cost = ["<h2>Cost</h2><table><tr><th>method</th><th>fit s</th><th>wall s</th><th>peak MB</th><th>memory</th></tr>"]
    for r in rows[1:]:
        cost.append("<tr><th>" + escape(str(r["method"])) + "</th>" + "".join(
            f"<td>{escape(str(_fmt(k, r.get(k))))}</td>" for k in COST_COLUMNS) + "</tr>")
    cost.append("</table><p class=note>fit s: sum of per-stage seconds; wall s: the erase call with the shared "
                "data already made; memory: what peak MB measures.</p>")
    page = render_html(sources, title, after_results="\n".join(cost))
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
