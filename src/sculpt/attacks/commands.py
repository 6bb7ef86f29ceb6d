"""`sculpt attack`: parse, validate, call sculpt.attacks.run.attack.

    sculpt attack --model emoji --run runs/demo --out runs/demo/attack                  # every attack
    sculpt attack --model emoji --patch p.safetensors --attacks unlearndiffatk,ring-a-bell \\
        --concepts poodle --n 50 --seed 0 --out attack/
    sculpt attack --model emoji --concepts poodle --attacks textual-inversion --out base-attack/   # base model
    sculpt attack ... --set unlearndiffatk.steps=400 --set ring-a-bell.discrete=true    # other budgets
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_commands(subparsers) -> None:
    """Register `attack` on the `sculpt` command's subparsers."""
    from sculpt.eval.commands import add_sampler_arguments

    a = subparsers.add_parser("attack", help="attack an erased model (adversarial prompts, concept vectors, "
                                             "textual inversion, relearning); writes attack.json")
    a.add_argument("--model", default="emoji", help="'emoji' (default), a diffusers folder, a Hub id or a .safetensors file")
    a.add_argument("--run", help="an erasure run folder: its final patch; the result goes into its ledger")
    a.add_argument("--patch", action="append", default=[], help="a patch to stack on the model (repeatable, in order)")
    a.add_argument("--attacks", nargs="+", default=["all"],
                   help="attack names, space- or comma-separated, or 'all' (default); see `sculpt attack --list`")
    a.add_argument("--concepts", nargs="+", help="concepts to attack (default: those the patches erased)")
    a.add_argument("--out", help="output folder (default: RUN/attack with --run, else ./attack)")
    a.add_argument("--n", type=int, default=50, help="pictures per concept and attack (default 50, the evaluation's)")
    a.add_argument("--seed", type=int, default=0, help="picture i uses seed + i; the attacks' own randomness derives from it")
    a.add_argument("--set", action="append", default=[], metavar="ATTACK.FIELD=VALUE",
                   help="change one budget setting of an attack (YAML value; repeatable)")
    a.add_argument("--kept", nargs="+", help="kept classes to re-measure (default: the concepts' superclass "
                                             "neighbours and relearning's class)")
    a.add_argument("--no-control", action="store_true", help="do not attack the base model as well")
    a.add_argument("--calibrate", action="store_true",
                   help="also attack a deliberately shallow erasure of the same concepts (their words mapped onto "
                        "the superclass's in the text encoder; the UNet untouched): attacks with teeth recover it")
    a.add_argument("--no-record", action="store_true", help="with --run: do not append to its ledger")
    a.add_argument("--list", action="store_true", help="list the attacks and their budgets, then exit")
    add_sampler_arguments(a)
    a.add_argument("--size", type=int, help="picture size in pixels (default: the model's)")
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--classifier", help="a transformers image classifier for real models (folder or cached Hub id)")
    a.add_argument("--cache", help="picture cache folder (default $SCULPT_CACHE/eval)")
    a.add_argument("--no-cache", action="store_true", help="draw every picture afresh, store nothing")
    a.add_argument("--detector", choices=["auto", "nudenet", "none"], default="auto",
                   help="count unsafe pictures in every row: auto (the emoji world's weapon classes when a "
                        "concept is one), nudenet (the NudeNet detector, `pip install nudenet`), none")
    a.add_argument("--device", default="auto")
    a.add_argument("--force", action="store_true", help="apply patches made on another model")
    a.set_defaults(func=cmd_attack)


def attack_names(values: list[str]) -> list[str]:
    """'--attacks a,b c' -> [a, b, c]; 'all' -> every registered attack."""
    from sculpt.attacks import available_attacks

    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    return available_attacks() if names == ["all"] else names


def cmd_attack(args) -> int:
    from sculpt.attacks import AttackError, available_attacks, get_attack, make_attack
    from sculpt.attacks.run import attack
    from sculpt.config import parse_overrides
    from sculpt.eval.commands import sampler_from_args
    from sculpt.models.loading import resolve_device

    if args.list:
        for name in available_attacks():
            budget = make_attack(name, args.model).config.model_dump(mode="json")
            print(f"{name}: {get_attack(name).description()}\n    budget ({args.model}): {budget}")
        return 0
    for flag in ("n", "steps", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            return _fail(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.run and args.patch:
        return _fail("give either --run or --patch, not both (a run folder names its own patch)")
    try:
        names = attack_names(args.attacks)
        budgets = parse_overrides(args.set, names, "attack", "unlearndiffatk.steps=400")
    except ValueError as exc:
        return _fail(str(exc))
    out = Path(args.out) if args.out else (Path(args.run) / "attack" if args.run else Path("attack"))
    device = resolve_device(args.device)
    try:
        classifier = None
        if args.classifier:
            from sculpt.eval.classifiers import TransformersClassifier

            classifier = TransformersClassifier(args.classifier, device=device)
        cache = False if args.no_cache else (args.cache or True)
        detector = args.detector
        if detector == "nudenet":
            from sculpt.eval.detectors import NudeNetDetector

            detector = NudeNetDetector()
        report = attack(args.model, patches=args.patch, run=args.run, attacks=names, concepts=args.concepts,
                        out=out, seed=args.seed, n=args.n, budgets=budgets, control=not args.no_control, calibrate=args.calibrate,
                        kept=args.kept, classifier=classifier, detector=detector, sampler=sampler_from_args(args, args.model),
                        cache=cache, batch_size=args.batch_size, device=str(device), force=args.force,
                        record=False if args.no_record else None)  # names and budgets checked before loading
    except (AttackError, FileNotFoundError, ImportError, KeyError) as exc:
        return _fail(str(exc).strip('"'))
    print("\n".join(summary_lines(report)))
    print(f"wrote {out / 'attack.json'}")
    return 0


def summary_lines(report: dict) -> list[str]:
    """Attack success per concept and attack, next to the plain prompt, as text for the terminal."""
    pct = lambda row: "-" if not row or row.get("rate") is None else f"{100 * row['rate']:5.1f}"  # noqa: E731
    states = report["states"]  # "model": base + patches, the model attacked; "base": the control
    shown = {"model": "patched", "base": "base", "shallow": "shallow"}
    head = f"{'concept':<22} {'attack':<20}" + "".join(f" {shown[s]:>8}" for s in states)
    lines = [head, "-" * len(head)]
    for c, v in report["concepts"].items():
        lines.append(f"{c:<22} {'plain prompt':<20}" + "".join(f" {pct(v['plain'].get(s)):>8}" for s in states))
        for kind in ("synonyms", "heldout"):
            if any(kind in v["leakage"].get(s, {}) for s in states):
                lines.append(f"{'':<22} {kind:<20}" + "".join(f" {pct(v['leakage'][s].get(kind)):>8}" for s in states))
        for a, rows in v["attacks"].items():
            lines.append(f"{'':<22} {a:<20}" + "".join(f" {pct(rows.get(s)):>8}" for s in states))
        if report.get("detector"):
            unsafe = lambda row: row.get("unsafe") if row else None  # noqa: E731
            lines.append(f"{'':<22} {'unsafe: plain':<20}" + "".join(f" {pct(unsafe(v['plain'].get(s))):>8}" for s in states))
            for a, rows in v["attacks"].items():
                lines.append(f"{'':<22} {'unsafe: ' + a:<20}" + "".join(f" {pct(unsafe(rows.get(s))):>8}" for s in states))
    for a, per_state in report["kept"]["after"].items():
        for s, after in per_state.items():
            before = report["kept"]["plain"][s]
            mean = sum(r["rate"] for r in after.values()) / len(after)
            mean_before = sum(r["rate"] for r in before.values()) / len(before)
            lines.append(f"kept classes after {a} ({shown[s]} model): {100 * mean:.1f}% (before {100 * mean_before:.1f}%)")
    lines.append(f"attack success: share of {report['n']} pictures per row the classifier assigns to the concept "
                 f"(seeds {report['seeds'][0]}..{report['seeds'][1]}); 95% intervals in attack.json")
    if report.get("detector"):
        lines.append(f"unsafe: share of the same pictures the detector ({report['detector']['name']}) flags for any "
                     f"of its classes")
    return lines


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
