"""`sculpt demo`: the project's main job on the bundled emoji world, on a laptop CPU.

Erases a few of the ten targets one after another with the paper's method (settings scaled to the
small model, below), measures before and after with the emoji classifier and scorer, prints the
table and writes an image grid (prompt rows; base / erased columns). `--all` erases all ten.
`--unsafe` erases the weapons family instead (the paper's unsafe-content experiment in this world)
and prints the paper-style table: weapon pictures on implicit prompts, base vs erased.
"""

from __future__ import annotations

import time
from pathlib import Path

from sculpt.config import RunConfig

DEMO_TARGETS = ("tropical fish", "poodle", "church")

# The published configuration is for SD 1.4 (860M-parameter UNet, lr 3e-6, 10 x 50 steps). The
# emoji UNet is ~200x smaller and its training data 100x smaller in pixels: the same schedule shape
# (warm-up, 10 epochs, mask p = 0.5, K, tau, lambda_a) with a larger learning rate and shorter epochs.
# The loss weights were chosen on the development list (trumpet, rabbit, bus, strawberry, house;
# benchmarks/protocol.yaml), never on the ten targets, by the protocol's rule stated before the runs:
# the highest kept accuracy among settings that leave the development concepts at Total Acc <= 0.10.
# `python benchmarks/emoji_lists.py protocol1 NAME '{"lambda_kd": X, "lambda_nb": Y}' --n 16`, 16 pictures per
# prompt, 2026-11-29 (docs/results.md): lambda_kd in {0.25, 1, 2} x lambda_nb in {0, 1, 4}, then the
# best of those (0.25, 4) with the concepts' siblings kept too. Chosen: lambda_kd 0.25 (the published
# value), lambda_nb 4, the 4 nearest classes and the siblings: Total Acc 0.038, kept 0.966 (drop 1.1
# points), neighbours drop 1.8; the paper's losses alone: 0.075, 0.918 (drop 5.9), 12.0.
EMOJI_METHOD = {
    "name": "sculpting",
    "lr": 3e-4,
    "epochs": 10,
    "steps_per_epoch": 20,
    "warmup_steps": 20,
    "mask_update_every": 40,
    "batch_size": 8,
    "lambda_kd": 0.25,
    "lambda_nb": 4.0,
    "neighbours": 4,
    "neighbour_siblings": True,
}
EMOJI_DATA = {"n_images": 32, "num_inference_steps": 20, "guidance_scale": 4.0, "batch_size": 32,
              "prompt_template": "a photo of a {}"}

# Superclass (anchor) images: the concept as negative prompt (the paper) unless the emoji classifier
# finds that this removes the superclass; the rule is sculpt.data.anchors', the same for every concept
# and method, applied when the data is made and recorded in the ledger (poodle and church are such
# cases: "a photo of a dog" minus "poodle" draws no dog; `python benchmarks/emoji_anchors.py`).

# The unsafe experiment: the weapons family (seven classes) erased as one concept. Its anchor is the
# world's superclass named by the Unicode subgroup most members share ("tool": dagger, axe, bomb, bow
# and arrow, crossed swords), a rule on the taxonomy, not a choice on measured results. The anchor
# images go through the same anchor rule as the targets' (`python benchmarks/emoji_anchors.py --family`).
UNSAFE_FAMILY = "weapon"
UNSAFE_ANCHOR = "tool"


def unsafe_spec(output: Path, method: dict | None = None) -> RunConfig:
    """The weapons family as one concept: its members (measured one by one by the evaluation) and
    every word the world has for them (trained on)."""
    from sculpt.emoji.taxonomy import load_taxonomy

    tax = load_taxonomy()
    words = [s for w in tax.weapons for s in w.synonyms]
    concept = {"name": UNSAFE_FAMILY, "superclass": UNSAFE_ANCHOR, "members": list(tax.weapon_names),
               "synonyms": words}
    return RunConfig(model="emoji", output=str(output), mode="sequential",
                     method={**EMOJI_METHOD, **(method or {})}, data=EMOJI_DATA, concepts=[concept])


def demo_spec(targets: list[str], output: Path, method: dict | None = None) -> RunConfig:
    """Concept specs straight from the taxonomy: name, superclass, synonyms."""
    from sculpt.emoji.dataset import class_prompt
    from sculpt.emoji.taxonomy import load_taxonomy

    tax = load_taxonomy()
    # The prompts are the ones evaluation uses (the authors' script trained on "a photo of X" and
    # evaluated on "a photo of a X"; here they match), plus the taxonomy's synonyms.
    concepts = [{"name": t, "superclass": tax[t].superclass,
                 "prompts": [class_prompt(w) for w in (t, *tax[t].synonyms)]} for t in targets]
    return RunConfig(model="emoji", output=str(output), mode="sequential",
                     method={**EMOJI_METHOD, **(method or {})}, data=EMOJI_DATA, concepts=concepts)


def run_demo(all_targets: bool = False, output: Path | None = None, quick: bool = False, unsafe: bool = False) -> dict:
    """Erase, evaluate, draw the grid, write the HTML report; print the table and where things are."""
    from sculpt.emoji.dataset import class_prompt
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.erase import erase
    from sculpt.eval.evaluate import EvalSettings, default_image_cache, evaluate
    from sculpt.models.loading import load_pipeline
    from sculpt.report import write_report

    t0 = time.perf_counter()
    tax = load_taxonomy()
    output = Path(output or ("runs/demo-unsafe" if unsafe else "runs/demo"))
    if unsafe:
        cfg = unsafe_spec(output)
        print(f"sculpt demo --unsafe: erasing the {UNSAFE_FAMILY} family ({', '.join(tax.weapon_names)}) from the "
              f"emoji world, mapped onto '{UNSAFE_ANCHOR}'", flush=True)
        grid_prompts = [class_prompt(w) for w in (*tax.weapon_names, UNSAFE_ANCHOR)]
        title = f"sculpt demo --unsafe: {UNSAFE_FAMILY} -> {UNSAFE_ANCHOR}"
    else:
        targets = list(tax.target_names) if all_targets else list(DEMO_TARGETS)
        cfg = demo_spec(targets, output)
        print(f"sculpt demo: erasing {', '.join(targets)} from the emoji world, one after another", flush=True)
        grid_prompts = [p for t in targets for p in (class_prompt(t), class_prompt(tax[t].superclass))]
        title = "sculpt demo: " + ", ".join(targets)
    pipe = load_pipeline("emoji")  # loaded once: erasure, evaluation and grid see the same base weights
    base = {n: t.clone() for n, t in pipe.unet.state_dict().items()}
    result = erase(cfg, pipe=pipe)
    t_erase = time.perf_counter() - t0
    erased = {n: t.clone() for n, t in pipe.unet.state_dict().items()}
    pipe.unet.load_state_dict(base)

    # What the table prints, no more: forgetting, kept classes, coherence, scorer and FID on the kept
    # classes (quality), synonyms and held-out paraphrases, revival over the stages; unsafe counts on
    # the implicit prompts only in the unsafe demo (16 prompts x n pictures).
    n = 8 if quick else (50 if all_targets else 16)
    settings = EvalSettings(n=n, n_paraphrase=max(4, n // 4), n_unsafe=n, quality=True, unsafe=unsafe,
                            paraphrases=not quick).for_model("emoji")
    print(f"evaluating base and erased model ({n} pictures per class prompt, "
          f"{settings.sampler.scheduler} {settings.sampler.steps} steps {settings.sampler.precision})", flush=True)
    t_eval = time.perf_counter()
    metrics = evaluate(model="emoji", pipe=pipe, run=result.output, out=output / "eval", settings=settings)
    t_eval = time.perf_counter() - t_eval
    grid = write_demo_grid(pipe, base, erased, grid_prompts, output / "demo_grid.png", settings.sampler,
                           default_image_cache())
    report = write_report([output], output / "report.html", title=title)
    print_table(metrics)
    if unsafe:
        print_unsafe_table(metrics)
    print(f"\nreport:  {report}\ngrid:    {grid}\nmetrics: {output / 'eval' / 'metrics.json'}\n"
          f"patch:   {result.patch_path}\nwall time: {time.perf_counter() - t0:.0f}s "
          f"(erasure {t_erase:.0f}s, evaluation {t_eval:.0f}s)")
    return metrics


def _f(v, digits: int = 2) -> str:
    """A measured number, or '-' where nothing was measured (None / NaN)."""
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def print_table(m: dict) -> None:
    f = m["forgetting"]
    for name, r in m.get("resolution", {}).items():
        if r["measured"] != [name]:
            print(f"\n{name}: measured as its members {', '.join(r['measured'])}"
                  + (f"; no class for {', '.join(r['not_measured'])}" if r["not_measured"] else ""))
    print(f"\n{'concept':<22}{'base acc':>10}{'erased acc':>12}{'-> superclass':>15}")
    for c, acc in f["per_concept"].items():
        coh = m["superclass_coherence"][c]["model"]
        print(f"{c:<22}{_f(f['base_per_concept'][c]):>10}{_f(acc):>12}{_f(coh):>15}")
    if f["per_concept"]:
        print(f"{'Total Acc (erased)':<22}{_f(f['base_total_acc']):>10}{_f(f['total_acc']):>12}")
    p = m["preservation"]
    drop = 100 * p["drop"] if p["drop"] is not None else None
    print(f"{'kept classes acc':<22}{_f(p['base_acc']):>10}{_f(p['acc']):>12}   (drop {_f(drop, 1)} points)")
    q = m.get("quality", {})
    if "clip_kept" in q:
        print(f"{'scorer (kept)':<22}{_f(q['clip_kept']['base']):>10}{_f(q['clip_kept']['model']):>12}")
    if "fid" in q:
        print(f"{'FID (kept)':<22}{_f(q['fid']['base']):>10}{_f(q['fid']['model']):>12}")
    if "paraphrase_leakage" in m:
        for kind, v in m["paraphrase_leakage"].items():
            print(f"{'leakage: ' + kind:<22}{_f(v['base_mean']):>10}{_f(v['mean']):>12}")
    if m.get("revival"):
        r = m["revival"]
        revived = ", ".join(f"{x['concept']} (stage {x['stage']})" for x in r["revived"]) or "none"
        print(f"{'revival':<22}  after each later stage, threshold {r['threshold']:.2f}: {revived}")


def print_unsafe_table(m: dict) -> None:
    """The paper's unsafe table in this world: detector counts per unsafe class on the implicit
    prompts, base vs erased, the total, the reduction, and what it cost the kept classes."""
    u = m["unsafe"]
    base, model, d = u["base"], u["model"], u["detector"]
    print(f"\nunsafe pictures on {d['prompts']} implicit prompts x {m['settings']['n_unsafe']} seeds "
          f"({model['images']} pictures; {d.get('name', 'detector')}, threshold {d.get('threshold')})")
    print(f"{'class':<22}{'base':>10}{'erased':>12}")
    for c in d.get("classes", [k for k in base if k not in ("any", "images")]):
        print(f"{c:<22}{base[c]:>10d}{model[c]:>12d}")
    reduction = 100 * (1 - model["any"] / base["any"]) if base["any"] else float("nan")
    print(f"{'total (any class)':<22}{base['any']:>10d}{model['any']:>12d}   (reduction {reduction:.1f}%)")


def write_demo_grid(pipe, base: dict, erased: dict, prompts: list[str], path: Path, sampler, cache=None,
                    n: int = 4, seed: int = 0) -> Path:
    """Rows: the prompts (each erased concept's and its superclass's); columns: n base pictures | n
    erased pictures, seeds seed..seed+n-1: the evaluation's own pictures (same sampler, same cache)."""
    from sculpt.eval.sampling import Job, generate
    from sculpt.models.loading import model_hash
    from sculpt.report.images import image_grid

    jobs = [Job(p, seed + i) for p in prompts for i in range(n)]

    def draw(state):
        pipe.unet.load_state_dict(state)
        images = generate(pipe, jobs, sampler, model_hash(pipe), cache)
        return [images[k * n:(k + 1) * n] for k in range(len(prompts))]

    rows = [b + a for b, a in zip(draw(base), draw(erased))]
    pipe.unet.load_state_dict(base)
    image_grid(rows, row_labels=prompts, col_labels=["base"] * n + ["erased"] * n, cell=64).save(path)
    return path
