"""One setting of the paper's method on one concept list of the lists file, in sequence, measured.

    python benchmarks/emoji_lists.py LIST NAME ['{"lambda_nb": 0}'] [--n 50] [--out runs/lists]

LIST: a list of src/sculpt/emoji/assets/lists.yaml: targets, protocol1, heldout (development lists:
settings may be chosen on them) or sealed (measured only, never tuned on); or `unsafe`, the weapons
family as one concept (`sculpt demo --unsafe`'s spec). Erases the list with the demo's spec
(`sculpt.emoji.demo.demo_spec`, the JSON's fields over the method's), with the list's unprotected
siblings held out of every neighbour set (`RunConfig.unprotected`), evaluates the final patch with
`sculpt.eval.evaluate` (N pictures per class prompt, seeds 0..N-1, the emoji evaluation sampler) and
appends one JSON line to OUT/results.jsonl:

    total_acc        mean accuracy on the list's concepts (erased), and per concept
    kept groups      accuracy before -> after on the classes that are not erased, in three groups:
                     untouched (no stage of the run distils them), distilled (some stage's neighbour
                     set holds them: read from the run's ledger), unprotected (the lists file's
                     siblings, held out of every neighbour set); drop in points
    worst            the kept classes that lost most
    coherence        mean share of the concepts' prompts drawn as their superclass afterwards
    check            each concept's presence-check shares (sculpt.presence) and whether the check and
                     the evaluation agree (check: gone <=> evaluation accuracy <= the check's max_share)
    seconds          erase and evaluation wall time
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def group(pres: dict, names) -> dict:
    names = sorted(n for n in names if n in pres)
    base, model = mean(pres[n]["base"] for n in names), mean(pres[n]["model"] for n in names)
    return {"classes": len(names), "base": round(base, 4), "model": round(model, 4),
            "drop": round(100 * (base - model), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("list")
    ap.add_argument("name")
    ap.add_argument("method", nargs="?", default="{}")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--n-revival", type=int, default=4)
    ap.add_argument("--n-unsafe", type=int, default=64, help="pictures per implicit prompt (list unsafe)")
    ap.add_argument("--out", default="runs/lists")
    args = ap.parse_args()

    from sculpt import ledger
    from sculpt.emoji.demo import demo_spec, unsafe_spec
    from sculpt.emoji.lists import load_lists
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.erase import erase
    from sculpt.eval.evaluate import EvalSettings, evaluate
    from sculpt.models.loading import load_pipeline

    tax, lists = load_taxonomy(), load_lists()
    overrides = json.loads(args.method)
    out = Path(args.out) / args.list / args.name
    if args.list == "unsafe":
        cfg = unsafe_spec(out, method=overrides)
        erased, unprotected = list(tax.weapon_names), []
    else:
        names = lists.get(args.list)
        cfg = demo_spec(names, out, method=overrides)
        unprotected = sorted(set(lists.unprotected[args.list].values()))
        cfg.unprotected = unprotected
        erased = names
    t0 = time.time()
    result = erase(cfg, pipe=load_pipeline("emoji"), progress=False)
    erase_s = time.time() - t0
    t1 = time.time()
    settings = EvalSettings(n=args.n, n_revival=args.n_revival, n_unsafe=args.n_unsafe, quality=False,
                            paraphrases=False, unsafe=args.list == "unsafe").for_model("emoji")
    m = evaluate(model="emoji", pipe=load_pipeline("emoji"), patches=[out / "patch.safetensors"],
                 out=out / f"eval-{args.n}", settings=settings, progress=False)
    eval_s = time.time() - t1
    pres = m["preservation"]["per_class"]
    distilled = {w for e in ledger.read_ledger(out / "ledger.jsonl") if e["event"] == "stage"
                 for ws in e.get("neighbours", {}).values() for w, _ in ws}
    kept = [n for n in tax.names if n not in erased]
    untouched = [n for n in kept if n not in distilled and n not in unprotected]
    per_concept = m["forgetting"]["per_concept"]
    checks = {c: [s[c] for s in st["check"]["shares"]] for st in result.stages if "check" in st
              for c in st["check"]["shares"][0]}
    max_share = cfg.check.max_share
    agree = [(v[-1] <= max_share) == (per_concept.get(c, 0.0) <= max_share) for c, v in checks.items()
             if c in per_concept]
    row = {
        "list": args.list, "name": args.name, "method": overrides, "n": args.n,
        "total_acc": round(m["forgetting"]["total_acc"], 4), "per_concept": per_concept,
        "untouched": group(pres, untouched), "distilled": group(pres, distilled),
        "unprotected": group(pres, unprotected),
        "unprotected_each": {n: [pres[n]["base"], pres[n]["model"]] for n in unprotected if n in pres},
        "worst": {n: [v["base"], v["model"]] for n, v in sorted(pres.items(),
                                                               key=lambda kv: kv[1]["model"] - kv[1]["base"])[:6]},
        "coherence": round(mean(v["model"] for v in m["superclass_coherence"].values()), 4),
        "check": checks, "check_agrees": f"{sum(agree)}/{len(agree)}",
        "extra_rounds": sum(st.get("check", {}).get("extra_rounds", 0) for st in result.stages),
        "still_drawn": [c for st in result.stages for c in st.get("check", {}).get("remaining", [])],
        "erase_s": round(erase_s), "eval_s": round(eval_s),
    }
    if args.list == "unsafe":
        row["unsafe"] = m.get("unsafe")
    print(json.dumps(row), flush=True)
    with open(Path(args.out) / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
