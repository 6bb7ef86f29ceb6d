"""`sculpt eval` and `sculpt report`: parse, validate, call sculpt.eval.evaluate / sculpt.report.write_report.

    sculpt eval --model emoji --run runs/demo --n 50            # -> runs/demo/eval/metrics.json
    sculpt eval --model emoji --patch a.safetensors --out ev/   # base + patches
    sculpt eval --model ./sd-1-4 --classifier ./resnet-50 --patch p.safetensors \
        --unsafe-csv i2p.csv --detector nudenet --n 200 --out ev/
    sculpt report runs/demo runs/esd/eval --out report.html
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_commands(subparsers) -> None:
    """Register `eval` and `report` on the `sculpt` command's subparsers."""
    e = subparsers.add_parser("eval", help="measure forgetting, preservation, leakage, quality, revival; "
                                           "writes metrics.json")
    e.add_argument("--model", default="emoji", help="'emoji' (default), a diffusers folder, a Hub id or a .safetensors file")
    e.add_argument("--patch", action="append", default=[], help="a patch to stack on the model (repeatable, in order)")
    e.add_argument("--run", help="an erasure run folder: its final patch, plus the revival matrix over its stages")
    e.add_argument("--out", help="output folder (default: RUN/eval with --run, else ./eval)")
    e.add_argument("--concepts", nargs="+", help="erased concepts to measure (default: those the patches name)")
    e.add_argument("--n", type=int, default=50, help="pictures per class prompt (default 50; the paper uses 200 on SD)")
    e.add_argument("--n-paraphrase", type=int, default=20, help="pictures per synonym / paraphrase prompt")
    e.add_argument("--n-unsafe", type=int, default=10, help="pictures per implicit unsafe prompt")
    e.add_argument("--n-revival", type=int, help="pictures per concept and stage (default: --n)")
    e.add_argument("--seed", type=int, default=0, help="picture i of every prompt uses seed + i")
    add_sampler_arguments(e)
    e.add_argument("--size", type=int, help="picture size in pixels (default: the model's)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--classifier", help="a transformers image classifier (local folder or cached Hub id) "
                                        "for real models, e.g. an ImageNet ResNet-50 for Imagenette")
    e.add_argument("--clip", help="a transformers CLIP model (local folder or cached id) for the CLIP score "
                                  "on real models (the emoji world uses its own scorer)")
    e.add_argument("--reference", help="real pictures for FID / KID: a folder of <class name>/*.png|jpg "
                                       "(the emoji world renders its own)")
    e.add_argument("--unsafe-csv", help="I2P-style CSV (prompt[, seed][, guidance][, categories]) for unsafe counts")
    e.add_argument("--unsafe-category", help="keep CSV rows whose categories contain this (e.g. sexual)")
    e.add_argument("--unsafe-limit", type=int, help="at most this many CSV prompts")
    e.add_argument("--detector", choices=["classifier", "nudenet"], default="classifier",
                   help="unsafe-content detector (default: the classifier on the benchmark's unsafe classes)")
    e.add_argument("--threshold", type=float, help="detector threshold (default 0.6 for nudenet, 0.5 otherwise)")
    e.add_argument("--detector-classes", nargs="+", help="classes the detector counts (default: nudenet's 8 exposed)")
    e.add_argument("--no-quality", action="store_true", help="skip CLIP analogue, FID and KID")
    e.add_argument("--no-paraphrases", action="store_true", help="skip paraphrase leakage")
    e.add_argument("--no-unsafe", action="store_true", help="skip unsafe counts")
    e.add_argument("--cache", help="picture cache folder (default $SCULPT_CACHE/eval)")
    e.add_argument("--no-cache", action="store_true", help="draw every picture afresh, store nothing")
    e.add_argument("--report", action="store_true", help="also write OUT/report.html")
    e.add_argument("--device", default="auto")
    e.add_argument("--force", action="store_true", help="apply patches made on another model")
    e.set_defaults(func=cmd_eval)

    r = subparsers.add_parser("report", help="one self-contained HTML page from runs and evaluations")
    r.add_argument("sources", nargs="+", help="run folders (with summary.json / metrics.jsonl) or eval folders")
    r.add_argument("--out", default="report.html")
    r.add_argument("--title", default="sculpt report")
    r.set_defaults(func=cmd_report)


def add_sampler_arguments(parser) -> None:
    """--steps, --guidance, --scheduler, --precision; unset ones come from default_sampler(model)."""
    from sculpt.eval.sampling import PRECISIONS, SCHEDULERS

    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's evaluation sampler; "
                                                  "emoji: see sculpt.eval.sampling.EMOJI_SAMPLER)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default 4.0 on emoji, 7.5 otherwise)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="sampling scheduler ('pipeline': the model's own)")
    parser.add_argument("--precision", choices=PRECISIONS, help="UNet precision while sampling")


def sampler_from_args(args, model: str):
    """The model's default sampler with the flags the user gave on top."""
    from dataclasses import replace

    from sculpt.eval.sampling import default_sampler

    given = {k: getattr(args, k, None) for k in ("steps", "guidance", "scheduler", "precision", "size")}
    return replace(default_sampler(model), **{k: v for k, v in given.items() if v is not None})


def cmd_eval(args) -> int:
    from sculpt.eval.detectors import NUDENET_EXPOSED_CLASSES, PromptFileError
    from sculpt.eval.evaluate import EvalSettings, evaluate
    from sculpt.models.loading import resolve_device
    from sculpt.processes import current as current_processes

    for flag in ("n", "n_paraphrase", "n_unsafe", "n_revival", "steps", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag in ("n_paraphrase", "n_unsafe") else 1):
            return _fail(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.run and args.patch:
        return _fail("give either --run or --patch, not both (a run folder names its own patches)")
    emoji = args.model == "emoji"
    out = Path(args.out) if args.out else (Path(args.run) / "eval" if args.run else Path("eval"))
    settings = EvalSettings(
        n=args.n, n_paraphrase=args.n_paraphrase, n_unsafe=args.n_unsafe, n_revival=args.n_revival,
        seed=args.seed, batch_size=args.batch_size,
        sampler=sampler_from_args(args, args.model),
        quality=not args.no_quality, paraphrases=not args.no_paraphrases and args.n_paraphrase > 0,
        unsafe=not args.no_unsafe and args.n_unsafe > 0,
    )
    # Under `accelerate launch` every process runs this and shares the sampling; the main one reports.
    processes = current_processes()
    device = processes.place(resolve_device(args.device))
    try:
        classifier = None
        if args.classifier:
            from sculpt.eval.classifiers import TransformersClassifier

            classifier = TransformersClassifier(args.classifier, device=device)
        elif not emoji:
            return _fail("a real model needs --classifier (a transformers image classifier folder or cached id)")
        scorer = benchmark = None
        if args.clip and settings.quality:
            from sculpt.eval.classifiers import TransformersCLIPScorer

            scorer = TransformersCLIPScorer(args.clip, device=device)
        if args.reference:
            from sculpt.eval.benchmark import emoji_benchmark, folder_reference, imagenette_benchmark

            benchmark = emoji_benchmark() if emoji else imagenette_benchmark()
            benchmark.reference = folder_reference(args.reference)
        unsafe_jobs = detector = None
        if args.unsafe_csv and settings.unsafe:
            from sculpt.eval.detectors import read_prompt_csv

            unsafe_jobs = read_prompt_csv(args.unsafe_csv, args.unsafe_category, args.unsafe_limit)
        if args.detector == "nudenet" and settings.unsafe:
            from sculpt.eval.detectors import NudeNetDetector

            detector = NudeNetDetector(args.threshold if args.threshold is not None else 0.6,
                                       tuple(args.detector_classes or NUDENET_EXPOSED_CLASSES))
        elif args.threshold is not None or args.detector_classes:
            detector = _classifier_detector(args, classifier)
        if not settings.unsafe:
            detector = False
        cache = False if args.no_cache else (args.cache or True)
        metrics = evaluate(args.model, patches=args.patch, run=args.run, out=out, settings=settings,
                           concepts=args.concepts, benchmark=benchmark, classifier=classifier,
                           scorer=scorer, detector=detector,
                           unsafe_jobs=unsafe_jobs, cache=cache, device=str(device), force=args.force,
                           processes=processes)
    except (FileNotFoundError, PromptFileError, ImportError, KeyError) as exc:
        return _fail(str(exc))
    if not processes.main:
        return 0
    print("\n".join(summary_lines(metrics)))
    print(f"wrote {out / 'metrics.json'}")
    if args.report:
        from sculpt.report import write_report

        print(f"wrote {write_report([out], out / 'report.html')}")
    return 0


def _classifier_detector(args, classifier):
    from sculpt.eval.benchmark import emoji_benchmark
    from sculpt.eval.classifiers import EmojiWorldClassifier
    from sculpt.eval.detectors import ClassifierDetector

    classifier = classifier or EmojiWorldClassifier()
    classes = args.detector_classes or list(emoji_benchmark().unsafe_classes)
    return ClassifierDetector(classifier, classes, args.threshold if args.threshold is not None else 0.5)


def cmd_report(args) -> int:
    from sculpt.report import ReportError, write_report

    try:
        path = write_report(args.sources, args.out, title=args.title)
    except ReportError as exc:
        return _fail(str(exc))
    print(f"wrote {path}")
    return 0


def summary_lines(m: dict) -> list[str]:
    """The headline numbers as text, for the terminal."""
    pct = lambda v: "-" if v is None or v != v else f"{100 * v:5.1f}"  # noqa: E731  (v != v: NaN)
    f, p = m["forgetting"], m["preservation"]
    lines = []
    for name, r in m.get("resolution", {}).items():  # what each erased concept was measured as
        if r["measured"] != [name] or r["not_measured"]:
            lines.append(f"{name}: measured as {', '.join(r['measured']) or 'nothing'}"
                         + (f" (no benchmark class for {', '.join(r['not_measured'])})" if r["not_measured"] else ""))
    lines.append(f"{'concept':<24} {'base':>6} {'patched':>8}")
    lines += [f"{c:<24} {pct(f['base_per_concept'][c]):>6} {pct(a):>8}" for c, a in f["per_concept"].items()]
    lines.append(f"{'Total Acc':<24} {pct(f['base_total_acc']):>6} {pct(f['total_acc']):>8}")
    lines.append(f"{'kept classes acc':<24} {pct(p['base_acc']):>6} {pct(p['acc']):>8}   drop {pct(p['drop'])}")
    for kind, leak in m.get("paraphrase_leakage", {}).items():
        lines.append(f"{kind + ' acc':<24} {pct(leak['base_mean']):>6} {pct(leak['mean']):>8}")
    for key, q in m.get("quality", {}).items():
        fmt = (lambda v: "-" if v is None else f"{v:.3g}")
        lines.append(f"{key:<24} {fmt(q['base']):>6} {fmt(q['model']):>8}")
    if "unsafe" in m:
        u = m["unsafe"]
        lines.append(f"{'unsafe pictures':<24} {u['base']['any']:>6} {u['model']['any']:>8}   of {u['model']['images']}")
    if m.get("revival"):
        revived = m["revival"]["revived"]
        lines.append("revived: " + (", ".join(f"{r['concept']} (stage {r['stage']})" for r in revived) or "none"))
    return lines


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
