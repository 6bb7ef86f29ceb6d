"""The `sculpt` command line: parses, validates, and calls the library of the same names."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sculpt.config import SpecError

# `sculpt erase` finished and wrote its patch, but the presence check still finds a concept drawn.
ERASE_INCOMPLETE = 3


def cmd_erase(args) -> int:
    from sculpt.config import load_spec
    from sculpt.erase import erase

    cfg = load_spec(args.spec)
    if args.output:
        cfg.output = args.output
    from sculpt.erase import remaining_concepts

    result = erase(cfg, progress=not args.quiet)
    remaining = remaining_concepts(result.stages)
    if result.main_process:  # under `accelerate launch` the other processes have nothing to say
        forgot = [c for c in result.patch.concepts if c not in remaining]
        print(f"patch: {result.patch_path} ({len(result.patch.tensors)} tensors, "
              f"{result.patch.nbytes() / 1e6:.2f} MB); forgot {', '.join(forgot) or 'nothing'}")
        if remaining:
            print(f"sculpt erase: still drawn after the last extra round: {', '.join(remaining)} (the presence "
                  "check's bound, check.max_rounds, was reached; see summary.json and MODEL_CARD.md)",
                  file=sys.stderr)
    return ERASE_INCOMPLETE if remaining else 0


def _load(model: str, patches: list[str], force: bool, device: str):
    from sculpt.models.loading import load_pipeline, resolve_device
    from sculpt.patch import apply_patches

    pipe = load_pipeline(model, device=resolve_device(device))
    apply_patches(pipe, patches, force=force)
    return pipe


def cmd_apply(args) -> int:
    pipe = _load(args.model, args.patches, args.force, args.device)
    pipe.save_pretrained(args.save)
    print(f"saved {args.model} + {len(args.patches)} patch(es) to {args.save}")
    return 0


def cmd_generate(args) -> int:
    from sculpt.eval.commands import sampler_from_args
    from sculpt.eval.evaluate import default_image_cache
    from sculpt.eval.sampling import Job, generate
    from sculpt.models.loading import model_hash
    from sculpt.report.images import image_grid

    pipe = _load(args.model, args.patch, args.force, args.device)
    # The evaluation's sampler and seeds: picture i of a prompt is the one `sculpt eval` classified.
    sampler = sampler_from_args(args, args.model)
    jobs = [Job(prompt, args.seed + i) for prompt in args.prompt for i in range(args.n)]
    cache = None if args.no_cache else default_image_cache()  # the evaluation's pictures, when it drew them
    images = generate(pipe, jobs, sampler, model_hash(pipe), cache, desc="generate")
    rows = [images[k * args.n:(k + 1) * args.n] for k in range(len(args.prompt))]
    image_grid(rows, row_labels=args.prompt).save(args.out)
    print(f"wrote {args.out} ({type(sampler.make_scheduler(pipe)).__name__}, {sampler.steps} steps, "
          f"{sampler.precision}, guidance {sampler.guidance}, seeds {args.seed}..{args.seed + args.n - 1})")
    return 0


def cmd_demo(args) -> int:
    from sculpt.emoji.demo import run_demo

    if args.all and args.unsafe:
        print("error: --all and --unsafe are two different demos; choose one", file=sys.stderr)
        return 2
    run_demo(all_targets=args.all, output=Path(args.output) if args.output else None, quick=args.quick,
             unsafe=args.unsafe)
    return 0


def cmd_suggest(args) -> int:
    from sculpt.data.anchors import default_judge
    from sculpt.data.neighbours import default_vocabulary
    from sculpt.models.loading import load_pipeline, resolve_device
    from sculpt.suggest import check_anchor, suggest

    taxonomy = None
    if args.model == "emoji":
        from sculpt.emoji.taxonomy import load_taxonomy

        taxonomy = load_taxonomy()
    try:
        vocabulary = default_vocabulary(args.model, args.vocabulary)
        pipe = load_pipeline(args.model, device=resolve_device(args.device))
        s = suggest(args.concept, pipe, vocabulary, taxonomy, top=args.top, template=args.template)
        if s.superclass is not None and not args.no_check:
            from sculpt.config import DataConfig

            data = None
            if args.model == "emoji":
                from sculpt.emoji.demo import EMOJI_DATA

                data = DataConfig(**EMOJI_DATA)
            check_anchor(pipe, s, default_judge(args.model), data)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"concept:    {s.concept}")
    print(f"superclass: {s.superclass or '-'}   ({s.superclass_reason})")
    if s.members:
        print(f"members:    {', '.join(s.members)}")
    print(f"synonyms:   {', '.join(s.synonyms) or '-'}")
    print(f"neighbours at risk (cosine of the prompts' text-encoder states, '{s.template}'):")
    for word, sim in s.neighbours:
        mark = ("   (kept by the paper's method)" if word in s.keep else
                "   (the superclass: the method keeps it)" if word == s.superclass else "")
        print(f"  {sim:6.3f}  {word}{mark}")
    if s.anchor is not None:
        print(f"anchor:     {s.anchor['how']}")
    for note in s.notes:
        print(f"note: {note}")
    text = s.spec_yaml(args.model)
    if args.write:
        path = Path(args.write)
        if path.exists() and not args.force:
            print(f"error: {path} exists (--force to replace it)", file=sys.stderr)
            return 2
        path.write_text(text)
        print(f"\nspec written to {path}: edit it, then `sculpt erase {path}`")
    else:
        print("\nspec:\n" + text)
    return 0


def cmd_verify(args) -> int:
    from sculpt.verify import verify_run

    report = verify_run(args.run, remeasure=args.remeasure, n=args.n, tolerance=args.tolerance)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def cmd_methods(args) -> int:
    from sculpt.methods import available_methods, get_method

    for name in available_methods():
        print(f"{name}: {get_method(name).description()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sculpt", description="Make a text-to-image diffusion model forget concepts.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("erase", help="forget the concepts of a YAML spec; writes a patch")
    e.add_argument("spec")
    e.add_argument("--output", help="output folder (default: the spec's, or runs/<spec name>)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_erase)

    a = sub.add_parser("apply", help="load a model, stack patches in order, save the result")
    a.add_argument("--model", required=True, help="'emoji', a diffusers folder, a Hub id or a .safetensors file")
    a.add_argument("patches", nargs="+")
    a.add_argument("--save", required=True, help="folder for the patched pipeline")
    a.add_argument("--force", action="store_true", help="apply even if a patch was made on another model")
    a.add_argument("--device", default="auto")
    a.set_defaults(func=cmd_apply)

    g = sub.add_parser("generate", help="sample images from a model (+ patches) into a grid PNG")
    g.add_argument("--model", required=True)
    g.add_argument("--patch", action="append", default=[])
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("-n", type=int, default=4, help="images per prompt")
    from sculpt.eval.commands import add_sampler_arguments

    add_sampler_arguments(g)  # defaults: the model's evaluation sampler
    g.add_argument("--size", type=int, help="picture size in pixels (default: the model's)")
    g.add_argument("--seed", type=int, default=0, help="picture i of each prompt uses seed + i")
    g.add_argument("--no-cache", action="store_true", help="draw every picture afresh (default: read and fill "
                                                            "the picture cache that evaluation uses)")
    g.add_argument("--out", default="samples.png")
    g.add_argument("--force", action="store_true")
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="erase emoji concepts on the bundled model, evaluate, draw a grid")
    d.add_argument("--all", action="store_true", help="all ten targets instead of a few")
    d.add_argument("--unsafe", action="store_true",
                   help="erase the weapons family instead and count weapon pictures on implicit prompts")
    d.add_argument("--quick", action="store_true", help="smaller samples (a smoke run)")
    d.add_argument("--output", help="default: runs/demo (runs/demo-unsafe with --unsafe)")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("methods", help="list the erasure methods")
    m.set_defaults(func=cmd_methods)

    s = sub.add_parser("suggest", help="propose a concept's superclass, synonyms and the neighbours its erasure may hurt")
    s.add_argument("concept")
    s.add_argument("--model", default="emoji")
    s.add_argument("--vocabulary", help="words to rank, one per line (default: the emoji classes; the list "
                                        "shipped with sculpt for other models)")
    s.add_argument("--write", metavar="SPEC", help="write the proposed spec to this YAML file")
    s.add_argument("--force", action="store_true", help="replace an existing --write file")
    s.add_argument("--no-check", action="store_true", help="skip the measured anchor check")
    s.add_argument("--top", type=int, default=8, help="how many neighbours to show")
    s.add_argument("--template", default="a photo of a {}")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_suggest)

    v = sub.add_parser("verify", help="check a run's ledger, files and (optionally) its measured claims")
    v.add_argument("run", help="an erasure run folder")
    v.add_argument("--remeasure", action="store_true",
                   help="re-generate a small fixed sample and re-measure forgetting and preservation")
    v.add_argument("--n", type=int, default=8, help="images per class prompt when re-measuring")
    v.add_argument("--tolerance", type=float, default=0.25, help="allowed difference from recorded accuracy")
    v.set_defaults(func=cmd_verify)

    from sculpt.eval.commands import add_commands

    add_commands(sub)  # eval, report
    from sculpt.bench_cli import add_commands as add_bench

    add_bench(sub)  # bench
    from sculpt.attacks.commands import add_commands as add_attack

    add_attack(sub)  # attack
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sculpt.erase import RunError
    from sculpt.models.loading import ModelLoadError
    from sculpt.patch import PatchError

    try:
        return args.func(args)
    except (SpecError, ModelLoadError, PatchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 130 if isinstance(exc.__cause__, (KeyboardInterrupt,)) or "interrupted" in str(exc) else 1


if __name__ == "__main__":
    sys.exit(main())
