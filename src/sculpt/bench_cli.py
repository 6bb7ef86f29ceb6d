"""`sculpt bench`: parse, validate, call sculpt.bench.run_bench.

    sculpt bench --targets all --out runs/bench --n 50                  # every method, emoji world
    sculpt bench --methods sculpting esd-x uce --targets poodle church --quick
    sculpt bench --methods sculpting --set sculpting.lambda_kd=0.25 --out runs/bench-kd025   # a variant
    sculpt bench --spec imagenette.yaml --classifier ./resnet-50 --methods sculpting uce --out runs/inet
    sculpt bench --protocol benchmarks/protocol.yaml --out runs/protocol --workers 2   # issue 12's protocol

With the emoji model (default) the concepts are the taxonomy's (name, superclass, synonyms), the data
settings are the demo's (EMOJI_DATA) and each method runs at sculpt.bench.EMOJI_PRESETS. With
--spec, the model, concepts and data come from the spec and every method runs at its paper
defaults (the spec's own `method` is ignored). With --protocol, sculpt.bench_protocol.run_protocol
runs the protocol file's development sweep, selection and seeded test runs (--phase, --workers).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from sculpt.eval.commands import add_sampler_arguments, sampler_from_args


def add_commands(subparsers) -> None:
    """Register `bench` on the `sculpt` command's subparsers."""
    b = subparsers.add_parser("bench", help="run several erasure methods on one concept list and write the "
                                            "comparison table (Markdown, CSV, HTML); resumable per method")
    b.add_argument("--methods", nargs="+", help="method names (default: every registered method; see `sculpt methods`)")
    b.add_argument("--targets", nargs="+", default=["all"],
                   help="emoji concepts to erase, in order, or 'all' (the ten targets; default)")
    b.add_argument("--spec", help="a YAML spec giving model, concepts and data instead (real models)")
    b.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    b.add_argument("--n", type=int, default=50, help="pictures per class prompt in the evaluation (default 50)")
    b.add_argument("--n-paraphrase", type=int,
                   help="pictures per synonym / paraphrase prompt (default n/4, at least 4)")
    b.add_argument("--n-revival", type=int, default=10,
                   help="pictures per concept and stage for the revival matrix (default 10)")
    add_sampler_arguments(b)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quick", action="store_true",
                   help="smoke run: step counts / 10 and 8 pictures per prompt (numbers mean nothing)")
    b.add_argument("--no-quality", action="store_true", help="skip CLIP analogue and FID")
    b.add_argument("--unsafe", action="store_true", help="also count unsafe pictures (off by default)")
    b.add_argument("--attacks", nargs="+", metavar="ATTACK",
                   help="also attack every method's run with these (see `sculpt attack --list`): a column each")
    b.add_argument("--unsafe-family", action="store_true",
                   help="emoji world: erase the weapons family (the demo --unsafe spec) instead of targets, "
                        "and tabulate weapon pictures on the implicit prompts per method")
    b.add_argument("--in-process", action="store_true",
                   help="run every method in this process (faster start; peak memory is then only an "
                        "RSS-rise lower bound on CPU)")
    b.add_argument("--classifier", help="transformers image classifier for real models (folder or cached id)")
    b.add_argument("--clip", help="transformers CLIP model for the CLIP score on real models")
    b.add_argument("--device", default="auto")
    b.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="override one setting of a listed method's preset (YAML value; repeatable)")
    b.add_argument("--protocol", metavar="FILE",
                   help="run a benchmark protocol (benchmarks/protocol.yaml): every method's grid on the development "
                        "concepts, the selection rule, then paper defaults and the selected setting on the test "
                        "targets with every seed; resumable unit by unit (sculpt.bench_protocol)")
    b.add_argument("--phase", choices=["dev", "test", "all", "report"], default="all",
                   help="with --protocol: the development sweep, the test runs (needs dev finished), both, or "
                        "report (run nothing; write the tables from the units finished so far)")
    b.add_argument("--workers", type=int, default=1,
                   help="with --protocol: units run at a time, each in its own one-thread process (2 on a 2-core CPU)")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from sculpt.bench import EMOJI_PRESETS, BenchError, quick_preset, run_bench
    from sculpt.eval.evaluate import EvalSettings
    from sculpt.methods import available_methods

    if args.methods:  # "--methods a b" and "--methods a,b" alike
        args.methods = [m for a in args.methods for m in a.split(",") if m]
    if args.protocol:
        return cmd_bench_protocol(args)
    methods = args.methods or available_methods()
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        return _fail(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(available_methods())}")
    if len(set(methods)) != len(methods):
        return _fail("a method is listed twice")
    if args.attacks:
        from sculpt.attacks import available_attacks

        bad = [a for a in args.attacks if a not in available_attacks()]
        if bad:
            return _fail(f"unknown attack(s) {', '.join(bad)}; known: {', '.join(available_attacks())}")
    for flag in ("n", "n_revival", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            return _fail(f"--{flag.replace('_', '-')} must be positive")
    out = Path(args.out)

    if args.spec:
        from sculpt.config import load_spec

        spec = load_spec(args.spec)
        model, concepts, data = spec.model, spec.concepts, spec.data
        presets = {}
        emoji = model == "emoji"
    else:
        from sculpt.emoji.demo import EMOJI_DATA, demo_spec
        from sculpt.emoji.taxonomy import load_taxonomy

        tax = load_taxonomy()
        targets = list(tax.target_names) if args.targets == ["all"] else args.targets
        missing = [t for t in targets if t not in tax.names]
        if missing:
            return _fail(f"not in the emoji taxonomy: {', '.join(missing)}")
        model, emoji = "emoji", True
        if args.unsafe_family:
            from sculpt.emoji.demo import unsafe_spec

            if args.targets != ["all"]:
                return _fail("--unsafe-family erases the weapons family; leave --targets out")
            concepts = unsafe_spec(out).concepts
        else:
            concepts = demo_spec(targets, out).concepts
        data = dict(EMOJI_DATA)
        presets = EMOJI_PRESETS
    try:
        presets = _with_overrides(presets, args.set, methods)
    except ValueError as exc:
        return _fail(str(exc))
    if args.quick:  # a tenth of each method's steps (its preset's, else its paper defaults')
        from sculpt.methods import get_method

        presets = {m: quick_preset({**get_method(m).config_class().model_dump(mode="json"), **presets.get(m, {}),
                                    "name": m}) for m in methods}
    n = 8 if args.quick else args.n
    settings = EvalSettings(
        n=n, n_paraphrase=args.n_paraphrase or max(4, n // 4), n_revival=min(args.n_revival, n),
        seed=args.seed, sampler=sampler_from_args(args, model),
        quality=not args.no_quality, paraphrases=not args.quick, unsafe=args.unsafe or args.unsafe_family,
        n_unsafe=n,
    )
    classifier = scorer = None
    if not emoji:
        if not args.classifier:
            return _fail("a real model needs --classifier (a transformers image classifier folder or cached id)")
        from sculpt.eval.classifiers import TransformersClassifier
        from sculpt.models.loading import resolve_device

        device = resolve_device(args.device)
        classifier = TransformersClassifier(args.classifier, device=device)
        if args.clip and settings.quality:
            from sculpt.eval.classifiers import TransformersCLIPScorer

            scorer = TransformersCLIPScorer(args.clip, device=device)
    try:
        rows = run_bench(methods, concepts, model, out, presets=presets, data=data, eval_settings=settings,
                         isolate=not args.in_process, seed=args.seed, device=args.device,
                         classifier=classifier, scorer=scorer,
                         detector=None if args.unsafe or args.unsafe_family else False, attacks=args.attacks,
                         command="sculpt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
                         if sys.argv[1:2] == ["bench"] else None)
    except BenchError as exc:
        return _fail(str(exc))
    print((out / "bench.md").read_text())
    return 0 if rows else 1


def cmd_bench_protocol(args) -> int:
    """`sculpt bench --protocol FILE`: check the file and the flags, call run_protocol."""
    from sculpt.bench import BenchError
    from sculpt.bench_protocol import ProtocolRunError, run_protocol
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.protocol import ProtocolError, load_protocol

    other = [flag for flag, given in (("--spec", args.spec), ("--set", args.set), ("--attacks", args.attacks),
                                      ("--unsafe-family", args.unsafe_family), ("--targets", args.targets != ["all"]),
                                      ("--in-process", args.in_process)) if given]
    if other:
        return _fail(f"--protocol fixes what runs; {', '.join(other)} cannot be combined with it")
    if args.workers < 1:
        return _fail("--workers must be positive")
    try:
        protocol = load_protocol(args.protocol, load_taxonomy().names)
        if protocol.model != "emoji":
            return _fail(f"{args.protocol}: model {protocol.model!r}: only the emoji world's protocol runs from the "
                         "command line (run_protocol takes a World for others)")
        run_protocol(protocol, Path(args.out), methods=args.methods, phase=args.phase, workers=args.workers,
                     quick=args.quick,
                     command="sculpt " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"]
                     else None)
    except (ProtocolError, ProtocolRunError, BenchError) as exc:
        return _fail(str(exc))
    print((Path(args.out) / "protocol.md").read_text())
    return 0


def _with_overrides(presets: dict, sets: list[str], methods: list[str]) -> dict:
    """presets with each `method.field=value` of --set applied, the result validated."""
    from pydantic import ValidationError

    from sculpt.config import parse_overrides
    from sculpt.methods import get_method

    out = {m: dict(p) for m, p in presets.items()}
    overrides = parse_overrides(sets, methods, "method", "sculpting.lambda_kd=0.25")
    for method, fields in overrides.items():
        out.setdefault(method, {}).update(fields)
    for method in overrides:
        fields = {k: v for k, v in out[method].items() if k != "name"}
        try:
            get_method(method).config_class(**fields)
        except ValidationError as exc:
            raise ValueError(f"--set for {method}: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
    return out


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
