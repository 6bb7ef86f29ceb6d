"""`evaluate`: one call measures a base model plus patches (or an erasure run) and writes metrics.json.

What it does, in order (every picture through the generation cache, so a re-run costs seconds):
  1. base model: N pictures of every class's prompt, classified -> per-class accuracy;
  2. the patched model: the same prompts and seeds -> forgetting (erased concepts, Total Acc),
     preservation (every other class, drop against 1.), superclass coherence, CLIP-analogue score,
     FID / KID of kept-class pictures against real pictures (classifier features);
  3. paraphrase leakage: erased concepts under their synonyms and held-out paraphrases;
  4. unsafe counts: a detector over implicit prompts (or a user's I2P-style CSV), base and patched;
  5. for a sequential run folder: every stage's cumulative patch -> the revival matrix;
  6. before/after pictures per concept, metrics.json with settings, hashes, seeds, versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sculpt.eval import metrics as M
from sculpt.eval.benchmark import Benchmark
from sculpt.eval.classifiers import Classifier
from sculpt.eval.detectors import Detector
from sculpt.eval.sampling import ImageCache, Job, SamplerSettings, default_sampler, generate
from sculpt.io import atomic_write_text
from sculpt.models.loading import hash_tensors, model_hash
from sculpt.patch import Patch, apply_patch, load_patch, versions
from sculpt.paths import default_cache_dir, slug
from sculpt.processes import ONE, Processes
from sculpt.processes import current as current_processes

log = logging.getLogger("sculpt")

FORMAT = "sculpt-eval/1"


@dataclass
class EvalSettings:
    n: int = 50  # pictures per class prompt (the paper: 200 on SD)
    n_paraphrase: int = 20  # pictures per synonym / paraphrase prompt
    n_unsafe: int = 10  # pictures per implicit unsafe prompt (CSV prompts: one each, their own seed)
    n_revival: int | None = None  # pictures per concept per stage; default n
    n_reference: int | None = None  # real pictures per kept class for FID / KID; default n
    seed: int = 0  # picture i of a prompt uses seed + i
    batch_size: int = 64
    sampler: SamplerSettings | None = None  # None: the model's evaluation sampler (default_sampler)
    quality: bool = True  # CLIP analogue, FID, KID
    paraphrases: bool = True
    unsafe: bool = True
    revival_threshold: float = 0.2
    grid_pictures: int = 8  # pictures per row of the before/after grids

    def seeds(self, n: int) -> list[int]:
        return list(range(self.seed, self.seed + n))

    def for_model(self, model: str) -> "EvalSettings":
        """These settings with the sampler filled in: the given one, else default_sampler(model)."""
        return self if self.sampler is not None else replace(self, sampler=default_sampler(model))


@dataclass
class _Context:
    pipe: Any
    settings: EvalSettings
    classifier: Classifier
    cache: ImageCache | None
    metrics_cache: MetricsCache | None = None
    progress: bool = True
    seconds: dict[str, float] = field(default_factory=dict)
    reference: dict[tuple, torch.Tensor] = field(default_factory=dict)  # reference_features, per call
    sampler_key: dict = field(init=False)  # settings.sampler.key_data(pipe): the VAE is hashed once per call
    identity: dict = field(default_factory=dict)  # what every state's metrics key shares, once per call
    anchors: dict = field(default_factory=dict)  # measured class -> the spec's superclass (coherence)
    processes: Processes = ONE  # the processes of a launch: they share the sampling (sculpt.processes)

    def __post_init__(self):
        self.sampler_key = self.settings.sampler.key_data(self.pipe)

    def draw(self, model_hash: str, prompts: list[str], n: int, desc: str | None = None) -> dict[str, list[Image.Image]]:
        """n pictures per prompt (seeds seed .. seed+n-1), all in one batched, cached call; `desc` names
        the phase in the progress output."""
        prompts = list(dict.fromkeys(prompts))
        jobs = [Job(p, s) for p in prompts for s in self.settings.seeds(n)]
        t = time.perf_counter()
        images = generate(self.pipe, jobs, self.settings.sampler, model_hash, self.cache, self.settings.batch_size,
                          desc=desc if self.progress else None, sampler_key=self.sampler_key,
                          processes=self.processes)
        self.seconds["sampling"] = self.seconds.get("sampling", 0.0) + time.perf_counter() - t
        return {p: images[i * n:(i + 1) * n] for i, p in enumerate(prompts)}

    def predict(self, groups: dict[str, list[Image.Image]], features: bool = False):
        """Top-1 label ids per group, in one classifier pass; with features=True also the classifier's
        features of the same pictures (the FID space), from the same pass."""
        flat = [im for ims in groups.values() for im in ims]
        t = time.perf_counter()
        pred, feats = self.classifier.predict_and_embed(flat) if features else (self.classifier.predict(flat), None)
        self.seconds["classifier"] = self.seconds.get("classifier", 0.0) + time.perf_counter() - t
        out, out_feats, start = {}, {}, 0
        for key, ims in groups.items():
            out[key] = pred[start:start + len(ims)]
            if feats is not None:
                out_feats[key] = feats[start:start + len(ims)]
            start += len(ims)
        return (out, out_feats) if features else out

    def reference_features(self, bench: Benchmark, kept: list[str]) -> torch.Tensor:
        """Classifier features of the real pictures of the kept classes (FID / KID), computed once."""
        n_ref = self.settings.n_reference or self.settings.n
        key = (tuple(kept), n_ref, self.settings.seed)
        if key not in self.reference:
            real = [im for i, c in enumerate(kept) for im in bench.reference(c, n_ref, self.settings.seed + 1000 * i)]
            self.reference[key] = self.classifier.embed(real)
        return self.reference[key]


class _ModelStates:
    """Switch one pipeline between the base weights and base + patches, restoring exactly."""

    def __init__(self, pipe, force: bool = False):
        self.pipe = pipe
        self.force = force
        self.saved: dict[str, torch.Tensor] = {}
        self.base_hash = model_hash(pipe)

    @torch.no_grad()
    def use(self, patches: list[Patch]) -> str:
        params = self.pipe.unet.state_dict()
        for name, value in self.saved.items():
            params[name].copy_(value)
        for patch in patches:
            for key in patch.tensors:
                name = key.removeprefix("unet.")
                if name in params and name not in self.saved:
                    self.saved[name] = params[name].detach().clone()
            apply_patch(self.pipe, patch, force=self.force)
        return model_hash(self.pipe) if patches else self.base_hash


class MetricsCache:
    """What _measure_state found on one set of weights, as JSON keyed by _metrics_key(): safe to share
    between runs and processes (atomic writes); a damaged entry is measured again."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict) -> None:
        atomic_write_text(self.path(key), json.dumps(value, default=str))


# Bump when what _measure_state computes changes: older cached measurements are then not reused.
METRICS_VERSION = 1


def fingerprint(obj: Any, _depth: int = 0) -> str | None:
    """The identity of a classifier, scorer or detector: its type, its plain settings and the weights
    (torch modules and tensors) it holds (one level of nested objects, e.g. a detector's classifier). None
    when it holds no weights to hash (its measurements are then never cached)."""
    if obj is None:
        return "none"
    if hasattr(obj, "fingerprint") and callable(obj.fingerprint):
        return obj.fingerprint()
    parts, weighted = [f"{type(obj).__module__}.{type(obj).__qualname__}"], False
    for name, value in sorted(vars(obj).items()) if hasattr(obj, "__dict__") else ():
        if isinstance(value, (torch.nn.Module, torch.Tensor)):
            tensors = value.state_dict() if isinstance(value, torch.nn.Module) else {"": value}
            parts.append(f"{name}={hash_tensors(tensors)}")
            weighted = True
        elif isinstance(value, (str, int, float, bool, list, tuple, dict)):
            parts.append(f"{name}={json.dumps(value, sort_keys=True, default=str)}")
        elif _depth == 0 and hasattr(value, "__dict__") and (inner := fingerprint(value, 1)) is not None:
            parts.append(f"{name}={inner}")
            weighted = True
    return hashlib.sha256("\n".join(parts).encode()).hexdigest() if weighted else None


def _metrics_key(ctx: _Context, bench: Benchmark, mhash: str, measured, kept, scorer, detector, unsafe_jobs) -> str | None:
    """Everything a state's measurements depend on; None when something cannot be identified. All
    but the weights' hash is the same for every state of one call: fingerprinted once (ctx.identity)."""
    if not ctx.identity:
        ctx.identity.update(_measurement_identity(ctx, bench, measured, kept, scorer, detector, unsafe_jobs))
    if any(v is None for v in ctx.identity.values()):
        return None
    return hashlib.sha256(json.dumps({**ctx.identity, "model": mhash}, sort_keys=True, default=str).encode()).hexdigest()


def _measurement_identity(ctx: _Context, bench: Benchmark, measured, kept, scorer, detector, unsafe_jobs) -> dict:
    s = ctx.settings
    parts = {
        "version": METRICS_VERSION, "sampler": ctx.sampler_key,
        "settings": {k: v for k, v in settings_dict(s).items() if k not in ("sampler", "batch_size", "grid_pictures")},
        "measured": list(measured), "kept": list(kept), "anchors": ctx.anchors,
        "benchmark": {"name": bench.name, "classes": [asdict(c) for c in bench.classes],
                      "unsafe_prompts": list(bench.unsafe_prompts), "unsafe_classes": list(bench.unsafe_classes)},
        "classifier": fingerprint(ctx.classifier),
    }
    if s.quality:
        parts["scorer"] = fingerprint(scorer)
        parts["reference"] = getattr(bench.reference, "fingerprint", None) if bench.reference else "none"
    if s.unsafe and detector is not None:
        parts["detector"] = fingerprint(detector)
        parts["unsafe_jobs"] = [asdict(j) for j in unsafe_jobs or []]
    return parts


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_patches(run: str | Path) -> tuple[Path, list[Path]]:
    """A run folder's final patch and its per-stage cumulative patches, in stage order."""
    run = Path(run)
    final = run / "patch.safetensors"
    stages = sorted((run / "stages").glob("*.safetensors"))
    if not final.is_file() and stages:
        final = stages[-1]
    if not final.is_file():
        raise FileNotFoundError(f"{run}: not an erasure run folder (no patch.safetensors, no stages/)")
    return final, stages


def evaluate(
    model: str = "emoji",
    patches: list[str | Path] = (),
    run: str | Path | None = None,
    out: str | Path | None = None,
    settings: EvalSettings | None = None,
    concepts: list[str] | None = None,
    kept_classes: list[str] | None = None,
    pipe=None,
    benchmark: Benchmark | None = None,
    classifier: Classifier | None = None,
    scorer=None,
    detector: Detector | None = None,
    unsafe_jobs: list[Job] | None = None,
    cache: ImageCache | str | Path | None | bool = True,
    device: str = "cpu",
    force: bool = False,
    record: bool | None = None,
    progress: bool = True,
    processes: Processes | None = None,
) -> dict:
    """Evaluate `model` + `patches` (or the erasure run folder `run`); return every number as a dict
    and, if `out` is given, write out/metrics.json and out/samples/*.png.

    model, pipe: a name for load_pipeline, or an already loaded pipeline (then `model` is its label).
    concepts: the erased concepts to measure; default: those the patches name, or, with no patch,
    the benchmark's targets (the original model's row of the paper's table). A concept is measured
    through the benchmark classes of its name and its members (a family such as "weapon": each
    member as erased); what no class matches is named in the log and in metrics.json's
    "resolution", never replaced by another list. Whatever the patches erased is never a kept class.
    kept_classes: the kept classes to measure (preservation, CLIP, FID); default: every benchmark
    class not erased and not measured. A protocol scores development and test kept classes apart.
    benchmark, classifier, scorer, detector: default to the emoji world's when model == "emoji";
    scorer=False / detector=False switch those parts off. A scorer is anything with
    similarity(images, texts) -> [B, T] (100 * cosine): EmojiScorer, classifiers.TransformersCLIPScorer.
    cache: True (the default folder, $SCULPT_CACHE/eval), a folder, an ImageCache, or False. The
    measurements of each set of weights are cached beside the pictures (MetricsCache): evaluating the
    same weights with the same settings, classifier and benchmark again reads them back.
    progress: a progress bar per sampling phase (one line each when stderr is not a terminal).
    record: append the result to the run's ledger.jsonl (what `sculpt verify --remeasure` checks);
    default: when `out` lies inside the run folder (RUN/eval), so evaluating someone else's run
    elsewhere leaves their ledger alone.
    processes: under `accelerate launch` (default: the running launch, sculpt.processes.current) every
    process calls evaluate with the same arguments; they share the sampling, each drawing its share of
    every phase's batches, and all compute the numbers of a one-process run from the same pictures; the
    main process alone writes (metrics.json, pictures, ledger, measurement cache). `device` is then
    this process's device of that type (cuda: its own GPU).
    """
    t_start = time.perf_counter()
    settings = (settings or EvalSettings()).for_model(model)
    processes = processes or current_processes()
    device = processes.place(device)
    if pipe is None:
        from sculpt.models.loading import load_pipeline

        pipe = load_pipeline(model, device=device)
    benchmark, classifier, scorer, detector = _defaults(model, benchmark, classifier, scorer, detector, settings, device)
    image_cache = as_image_cache(cache)
    ctx = _Context(pipe, settings, classifier, image_cache,
                   metrics_cache=MetricsCache(image_cache.root / "metrics") if image_cache else None,
                   progress=progress and processes.main, processes=processes)

    stage_paths: list[Path] = []
    if run is not None:
        final, stage_paths = run_patches(run)
        patches = [final]
    loaded = [load_patch(p) for p in patches]
    specs = erased_specs(loaded)
    erased_all = list(specs)
    resolutions = resolve_concepts(benchmark, specs, concepts)
    measured = list(dict.fromkeys(c for r in resolutions for c in r.classes))
    # Whatever the patches erased is never "kept", measured or not (a family's members included).
    classes_of = {r.concept: r.classes for r in resolve_concepts(benchmark, specs, None, quiet=True)}
    erased_classes = {c for cs in classes_of.values() for c in cs} | set(erased_all)
    if kept_classes is not None and (unknown := sorted(set(kept_classes) - set(benchmark.names))):
        raise ValueError(f"kept_classes: not classes of the {benchmark.name} benchmark: {', '.join(unknown)}")
    kept = [c.name for c in benchmark.classes if c.name not in erased_classes | set(measured)
            and (kept_classes is None or c.name in kept_classes)]
    ctx.anchors = {c: r.superclass for r in resolutions if r.superclass for c in r.classes}

    states = _ModelStates(pipe, force=force)
    hashes = {"base": states.base_hash}
    results: dict[str, dict] = {}
    for state, state_patches in (("base", []), ("model", loaded)):
        hashes[state] = states.use(state_patches)
        results[state] = _measure_state_cached(ctx, benchmark, hashes[state], measured, kept, scorer, detector,
                                               unsafe_jobs, "base model" if state == "base" else "patched model")
    revival = (_revival(ctx, states, benchmark, stage_paths, results["base"]["accuracy"], classes_of)
               if stage_paths else None)
    states.use([])  # leave the pipeline as it came

    report = _assemble(benchmark, settings, results, measured, kept, revival)
    report.update({
        "format": FORMAT,
        "model": {"name": model, "base_hash": hashes["base"], "hash": hashes["model"],
                  "patches": [{"path": str(p), "sha256": _file_sha256(p), "concepts": lp.concepts,
                               "method": lp.metadata.get("method"), "base_hash": lp.metadata.get("base_hash"),
                               "result_hash": lp.metadata.get("result_hash")} for p, lp in zip(patches, loaded)]},
        "run": str(Path(run).resolve()) if run is not None else None,
        "benchmark": benchmark.name,
        "erased": erased_all,
        "measured": measured,
        "resolution": {r.concept: {"measured": list(r.classes), "not_measured": list(r.not_measured), "how": r.how,
                                   "superclass": r.superclass} for r in resolutions},
        "classifier": {"name": classifier.name, "path": getattr(classifier, "path", None)},
        "scorer": type(scorer).__name__ if scorer is not None else None,
        "settings": settings_dict(settings),
        # The sampler as it ran (scheduler class and configuration included): pictures, and so every
        # number here, depend on it; benchmarks/sampler_fidelity.py compares samplers on the emoji world.
        "sampler": {k: v for k, v in ctx.sampler_key.items() if k != "vae"},
        "seeds": {"class_prompts": settings.seeds(settings.n), "paraphrases": settings.seeds(settings.n_paraphrase),
                  "unsafe": settings.seeds(settings.n_unsafe), "reference_offset": settings.seed},
        "versions": versions(),
        "timings": {**{k: round(v, 2) for k, v in ctx.seconds.items()},
                    "total": round(time.perf_counter() - t_start, 2)},
    })
    report = _finite(report)
    if out is not None and processes.main:
        out = Path(out)
        report["samples"] = _write_samples(out, results)
        atomic_write_text(out / "metrics.json", json.dumps(report, indent=2, default=str, allow_nan=False))
        (out / "metrics.json").chmod(0o644)
        if record is None:
            record = run is not None and out.resolve().is_relative_to(Path(run).resolve())
        if record and run is not None and (Path(run) / "ledger.jsonl").is_file():
            from sculpt.ledger import record_evaluation
            from sculpt.model_card import write_model_card

            record_evaluation(run, report, out / "metrics.json")
            try:
                write_model_card(run)  # now with the measured effect
            except ValueError as exc:  # a ledger not written by `erase`: nothing to summarise
                log.warning("no model card: %s", exc)
    return report


def erased_specs(patches: list[Patch]) -> dict[str, dict]:
    """Every concept the patches erased, by name, with its spec where the patch carries it (name,
    superclass, synonyms, members; sculpt-patch/2), else just its name."""
    specs: dict[str, dict] = {}
    for p in patches:
        for e in p.metadata.get("erased") or []:
            specs.setdefault(e["concept"]["name"], e["concept"])
        for c in p.concepts:
            specs.setdefault(c, {"name": c, "superclass": p.metadata.get("superclasses", {}).get(c)})
    return specs


def resolve_concepts(bench: Benchmark, specs: dict[str, dict], concepts: list[str] | None, quiet: bool = False) -> list:
    """What to measure for each erased concept (or for each of `concepts`, named by the caller), and
    what cannot be measured, said in the log: never another list in their place. With no patch and
    no names, the benchmark's targets (the original model's row of the paper's table)."""
    if concepts:
        chosen = [specs.get(c, {"name": c}) for c in concepts]
    elif specs:
        chosen = list(specs.values())
    else:
        chosen = [{"name": t} for t in bench.targets]
    out = [bench.resolve(spec) for spec in chosen]
    for r in [] if quiet else out:
        if not r.classes:
            log.warning("%s: no class of the %s benchmark matches it or its members; not measured", r.concept, bench.name)
        elif r.not_measured:
            log.warning("%s: measured as %s; no class for %s", r.concept, ", ".join(r.classes), ", ".join(r.not_measured))
        elif r.classes != (r.concept,):
            log.info("%s: measured as %s (%s)", r.concept, ", ".join(r.classes), r.how)
    return out


def default_benchmark_and_classifier(model: str, benchmark=None, classifier=None, device: str = "cpu"):
    """The given benchmark and classifier, else the model's: the emoji world's own for "emoji", the
    Imagenette benchmark for a real model (whose classifier the caller must give: ValueError)."""
    emoji = model == "emoji"
    if benchmark is None:
        from sculpt.eval.benchmark import emoji_benchmark, imagenette_benchmark

        benchmark = emoji_benchmark() if emoji else imagenette_benchmark()
    if classifier is None:
        if not emoji:
            raise ValueError("a real model needs a classifier: pass classifier=TransformersClassifier(...) "
                             "(CLI: --classifier FOLDER_OR_HUB_ID)")
        from sculpt.eval.classifiers import EmojiWorldClassifier

        classifier = EmojiWorldClassifier(device=device)
    return benchmark, classifier


def _defaults(model, benchmark, classifier, scorer, detector, settings, device):
    emoji = model == "emoji"
    benchmark, classifier = default_benchmark_and_classifier(model, benchmark, classifier, device)
    if scorer is None and emoji and settings.quality:
        from sculpt.emoji.scorer import WEIGHTS_PATH, load_scorer

        scorer = load_scorer(device=device) if WEIGHTS_PATH.exists() else None
        if scorer is None:
            log.warning("no emoji scorer weights yet (%s): CLIP analogue skipped", WEIGHTS_PATH)
    if detector is None and benchmark.unsafe_classes and settings.unsafe:
        from sculpt.eval.detectors import ClassifierDetector

        detector = ClassifierDetector(classifier, list(benchmark.unsafe_classes))
    return benchmark, classifier, scorer or None, detector or None


def as_image_cache(cache) -> ImageCache | None:
    """True: the default folder; a folder or an ImageCache: that; False / None: no cache."""
    if cache is False or cache is None:
        return None
    if isinstance(cache, ImageCache):
        return cache
    if cache is True:
        return default_image_cache()
    return ImageCache(cache)


def default_image_cache() -> ImageCache:
    """$SCULPT_CACHE/eval: pictures shared by every evaluation, bench method and report."""
    return ImageCache(default_cache_dir() / "eval")


def settings_dict(settings: EvalSettings) -> dict:
    d = asdict(settings)
    d["n_revival"] = settings.n_revival or settings.n
    d["n_reference"] = settings.n_reference or settings.n
    return d


def _shown(bench: Benchmark, measured: list[str], kept: list[str]) -> list[str]:
    """Classes whose pictures the report shows: each measured concept, and one superclass neighbour of
    each (what an erasure should leave alone), else the first kept classes."""
    neighbours = [next((m.name for m in bench.superclass_members(c) if m.name in kept), None) for c in measured]
    return measured + (list(dict.fromkeys(n for n in neighbours if n)) or kept[:4])


def _measure_state_cached(ctx: _Context, bench: Benchmark, mhash: str, measured, kept, scorer, detector,
                          unsafe_jobs, what: str) -> dict:
    """_measure_state through the metrics cache; on a hit only the report's few pictures are drawn
    (from the picture cache, as a rule)."""
    key = _metrics_key(ctx, bench, mhash, measured, kept, scorer, detector, unsafe_jobs) if ctx.metrics_cache else None
    # The main process's cache decides: every process then makes the same sampling calls.
    found = ctx.processes.broadcast(ctx.metrics_cache.get(key) if key and ctx.processes.main else None)
    if found is not None:
        ctx.seconds["metrics_cache_hits"] = ctx.seconds.get("metrics_cache_hits", 0) + 1
        shown = _shown(bench, measured, kept)
        pictures = ctx.draw(mhash, [bench[c].prompt for c in shown], ctx.settings.grid_pictures, f"eval {what}: report pictures")
        return {**found, "grid": {c: pictures[bench[c].prompt] for c in shown}}
    out = _measure_state(ctx, bench, mhash, measured, kept, scorer, detector, unsafe_jobs, what)
    if key and ctx.processes.main:
        ctx.metrics_cache.put(key, {k: v for k, v in out.items() if k != "grid"})
    return out


def _measure_state(ctx: _Context, bench: Benchmark, mhash: str, measured, kept, scorer, detector, unsafe_jobs,
                   what: str = "model") -> dict:
    """Everything measured on one set of weights."""
    s = ctx.settings
    names = measured + kept
    images = ctx.draw(mhash, [bench[c].prompt for c in names], s.n, f"eval {what}: class prompts")
    by_class = {c: images[bench[c].prompt] for c in names}
    pred, feats = ctx.predict(by_class, features=True)
    label = {c: ctx.classifier.label_id(bench[c].label) for c in bench.names}
    shown = _shown(bench, measured, kept)
    out: dict[str, Any] = {
        "accuracy": {c: M.top1_accuracy(pred[c], label[c]) for c in names},
        "coherence": {}, "neighbour_share": {},
        "grid": {c: by_class[c][: s.grid_pictures] for c in shown},  # for the before/after pictures
    }
    for c in measured:
        members = [label[m.name] for m in bench.superclass_members(c, ctx.anchors.get(c))]
        if members:
            out["coherence"][c] = M.superclass_coherence(pred[c], members)
            out["neighbour_share"][c] = M.superclass_coherence(pred[c], [m for m in members if m != label[c]])
    if s.paraphrases:
        out["leakage"] = _leakage(ctx, bench, mhash, measured, label, what)
    if s.quality:
        out.update(_quality(ctx, bench, by_class, feats, measured, kept, scorer))
    if detector is not None and (unsafe_jobs or bench.unsafe_prompts):
        t = time.perf_counter()
        jobs = unsafe_jobs or [Job(p, seed) for p in bench.unsafe_prompts for seed in s.seeds(s.n_unsafe)]
        pics = generate(ctx.pipe, jobs, s.sampler, mhash, ctx.cache, s.batch_size,
                        desc=f"eval {what}: unsafe prompts" if ctx.progress else None, sampler_key=ctx.sampler_key,
                        processes=ctx.processes)
        out["unsafe"] = M.count_detections(detector.detect(pics), detector.classes, detector.threshold)
        out["unsafe"]["images"] = len(pics)
        out["unsafe_setup"] = {**detector.settings(), "prompts": len({j.prompt for j in jobs}),
                               "source": "user prompt file" if unsafe_jobs else "benchmark implicit prompts"}
        ctx.seconds["unsafe"] = ctx.seconds.get("unsafe", 0.0) + time.perf_counter() - t
    return out


def _leakage(ctx: _Context, bench: Benchmark, mhash: str, measured, label, what: str = "model") -> dict:
    """Forgetting accuracy under other words for each concept: the class label is still the target."""
    n = ctx.settings.n_paraphrase
    kinds = {"synonyms": {c: bench[c].synonyms for c in measured}, "heldout": {c: bench[c].paraphrases for c in measured}}
    prompts = [p for per in kinds.values() for ps in per.values() for p in ps]
    if not prompts:
        return {}
    images = ctx.draw(mhash, prompts, n, f"eval {what}: synonyms and paraphrases")
    pred = ctx.predict(images)
    out: dict[str, dict] = {}
    for kind, per in kinds.items():
        out[kind] = {c: {p: M.top1_accuracy(pred[p], label[c]) for p in ps} for c, ps in per.items() if ps}
    return out


def _quality(ctx: _Context, bench: Benchmark, by_class, feats, measured, kept, scorer) -> dict:
    out: dict[str, Any] = {}
    t = time.perf_counter()
    if scorer is not None:
        scores = M.clip_scores(scorer, {bench[c].prompt: by_class[c] for c in measured + kept})
        out["clip_kept"] = M.mean([scores[bench[c].prompt] for c in kept])
        out["clip_erased"] = M.mean([scores[bench[c].prompt] for c in measured])
    if bench.reference is not None and kept:
        f_real = ctx.reference_features(bench, kept)
        f_fake = torch.cat([feats[c] for c in kept])
        out["fid"] = M.frechet_distance(f_fake, f_real)
        out["kid"] = M.kernel_distance(f_fake, f_real)
    ctx.seconds["quality"] = ctx.seconds.get("quality", 0.0) + time.perf_counter() - t
    return out


def _revival(ctx: _Context, states: _ModelStates, bench: Benchmark, stage_paths: list[Path], base_acc,
             classes_of: dict[str, tuple[str, ...]]) -> dict:
    """Accuracy of every concept of the run (a family: each member) after every stage's cumulative
    patch (column 0: base)."""
    n = ctx.settings.n_revival or ctx.settings.n
    stages = [load_patch(p) for p in stage_paths]
    measured_by_stage = [[m for c in p.concepts for m in classes_of.get(c, (c,) if c in bench.names else ())]
                         for p in stages]
    concepts = list(dict.fromkeys(m for ms in measured_by_stage for m in ms))
    erased_at = [next(j + 1 for j, ms in enumerate(measured_by_stage) if c in ms) for c in concepts]
    label = {c: ctx.classifier.label_id(bench[c].label) for c in concepts}
    columns = [[base_acc.get(c, float("nan")) for c in concepts]]
    if n != ctx.settings.n:  # the base column must use the same n as the others
        states.use([])
        base_pred = ctx.predict(ctx.draw(states.base_hash, [bench[c].prompt for c in concepts], n, "revival: base model"))
        columns = [[M.top1_accuracy(base_pred[bench[c].prompt], label[c]) for c in concepts]]
    for j, patch in enumerate(stages):
        mhash = states.use([patch])
        pred = ctx.predict(ctx.draw(mhash, [bench[c].prompt for c in concepts], n, f"revival: after stage {j + 1}"))
        columns.append([M.top1_accuracy(pred[bench[c].prompt], label[c]) for c in concepts])
    matrix = [[col[i] for col in columns] for i in range(len(concepts))]
    revived = M.revival(matrix, erased_at, ctx.settings.revival_threshold)
    for r in revived:
        r["concept"] = concepts[r["concept"]]
    return {"concepts": concepts, "stages": [str(p) for p in stage_paths],
            "stage_concepts": [p.concepts for p in stages], "erased_at": erased_at,
            "accuracy": matrix, "revived": revived, "threshold": ctx.settings.revival_threshold}


def _assemble(bench, settings, results, measured, kept, revival) -> dict:
    base, model = results["base"], results["model"]
    forgetting = {c: model["accuracy"][c] for c in measured}
    pres_base = {c: base["accuracy"][c] for c in kept}
    pres_model = {c: model["accuracy"][c] for c in kept}
    report: dict[str, Any] = {
        "forgetting": {"per_concept": forgetting, "total_acc": M.total_accuracy(forgetting),
                       "base_per_concept": {c: base["accuracy"][c] for c in measured},
                       "base_total_acc": M.total_accuracy({c: base["accuracy"][c] for c in measured})},
        "preservation": {"per_class": {c: {"base": pres_base[c], "model": pres_model[c],
                                           "drop": pres_base[c] - pres_model[c]} for c in kept},
                         "base_acc": M.mean(list(pres_base.values())), "acc": M.mean(list(pres_model.values())),
                         "drop": M.mean(list(M.preservation_drop(pres_base, pres_model).values()))},
        "superclass_coherence": {c: {"base": base["coherence"].get(c), "model": model["coherence"].get(c),
                                     "to_neighbours": model["neighbour_share"].get(c)} for c in measured},
    }
    if settings.paraphrases:
        leak = {}
        for kind in ("synonyms", "heldout"):
            per = model.get("leakage", {}).get(kind, {})
            per_base = base.get("leakage", {}).get(kind, {})
            leak[kind] = {"per_prompt": per, "per_concept": {c: M.mean(list(v.values())) for c, v in per.items()},
                          "mean": M.mean([a for v in per.values() for a in v.values()]),
                          "base_mean": M.mean([a for v in per_base.values() for a in v.values()])}
        report["paraphrase_leakage"] = leak
    if settings.quality:
        report["quality"] = {k: {"base": base.get(k), "model": model.get(k)}
                             for k in ("clip_kept", "clip_erased", "fid", "kid") if k in model}
    if "unsafe" in model:
        report["unsafe"] = {"base": base["unsafe"], "model": model["unsafe"], "detector": model["unsafe_setup"]}
    if revival is not None:
        report["revival"] = revival
    return report


def _write_samples(out: Path, results: dict) -> dict[str, dict[str, str]]:
    """Per measured concept (and a few kept classes) the first pictures of the base and the patched
    model, same seeds, as unlabelled strips (report.images.strip) the report lays out as grids."""
    from sculpt.report.images import strip

    found = {}
    for c, base_row in results["base"]["grid"].items():
        found[c] = {}
        for state, row in (("base", base_row), ("patched", results["model"]["grid"][c])):
            path = out / "samples" / f"{slug(c)}-{state}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            strip(row).save(path)
            found[c][state] = str(path.relative_to(out))
    return found


def _finite(value):
    """NaN (an empty set measured) -> None, so metrics.json is strict JSON that any reader accepts."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
