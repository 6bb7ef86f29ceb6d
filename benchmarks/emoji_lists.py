"""One setting of the paper's method on one concept list of the emoji world, in sequence, measured.

    python benchmarks/emoji_lists.py LIST NAME '{"lambda_nb": 0}' [--n 16] [--out runs/lists]

LIST: dev   the development list of benchmarks/protocol.yaml (trumpet, rabbit, bus, strawberry,
            house): settings are chosen here, and only here;
      test  the ten targets (reported, never tuned on);
      heldout  a second list nobody tunes on, by a rule fixed before any run: the last-listed class of
            each of the taxonomy's first five superclasses (shark, guide dog, mobile phone, pick, school).
Erases the list with the demo's spec (`sculpt.emoji.demo.demo_spec`, the JSON's fields over the
method's), evaluates the final patch with `sculpt.eval.evaluate` (N pictures per class prompt, seeds
0..N-1, the emoji evaluation sampler) and appends one JSON line to OUT/results.jsonl:

    total_acc        mean accuracy on the list's concepts (erased)
    kept, kept_base  mean accuracy on every other class (weapons included), after and before
    kept_drop        (kept_base - kept) * 100, points
    neighbours       the classes most at risk: each concept's siblings (same superclass) and its four
                     nearest classes in the text encoder's space (sculpt.data.neighbours), not erased;
                     their mean drop in points, and each one's before -> after
    coherence        mean share of the concepts' prompts drawn as their superclass afterwards
The neighbours measured here are fixed by that rule, whatever the method was told to keep.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

LISTS_HELDOUT_RULE = "last-listed class of each of the first five superclasses"


def concept_list(name: str) -> list[str]:
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.protocol import load_protocol

    tax = load_taxonomy()
    if name == "test":
        return list(tax.target_names)
    if name == "dev":
        return list(load_protocol(Path(__file__).with_name("protocol.yaml")).dev_concepts)
    if name == "heldout":
        supers = list(dict.fromkeys(c.superclass for c in tax.classes))[:5]
        return [[c.name for c in tax.classes if c.superclass == s][-1] for s in supers]
    raise SystemExit(f"unknown list {name!r}: dev, test or heldout")


def at_risk(pipe, names: list[str], k: int = 4) -> dict[str, list[str]]:
    from sculpt.config import Concept
    from sculpt.data.neighbours import nearest
    from sculpt.emoji.taxonomy import load_taxonomy

    tax = load_taxonomy()
    vocab = [c.name for c in tax.classes]
    out = {}
    for n in names:
        siblings = [c.name for c in tax.classes if c.superclass == tax[n].superclass and c.name not in names]
        near = [w for w, _ in nearest(pipe, Concept(name=n, superclass=tax[n].superclass), vocab, k, set(names))]
        out[n] = list(dict.fromkeys(siblings + near))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("list")
    ap.add_argument("name")
    ap.add_argument("method", nargs="?", default="{}")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--out", default="runs/lists")
    args = ap.parse_args()

    from sculpt.emoji.demo import demo_spec
    from sculpt.erase import erase
    from sculpt.eval.evaluate import EvalSettings, evaluate
    from sculpt.models.loading import load_pipeline

    names, overrides = concept_list(args.list), json.loads(args.method)
    out = Path(args.out) / args.list / args.name
    pipe = load_pipeline("emoji")
    risk = at_risk(pipe, names)
    t0 = time.time()
    erase(demo_spec(names, out, method=overrides), pipe=pipe, progress=False)
    erase_s = time.time() - t0
    base = load_pipeline("emoji")
    settings = EvalSettings(n=args.n, quality=False, paraphrases=False, unsafe=False).for_model("emoji")
    m = evaluate(model="emoji", pipe=base, patches=[out / "patch.safetensors"], out=out / f"eval-{args.n}",
                 settings=settings, progress=False)
    pres = m["preservation"]["per_class"]
    kept_base = sum(v["base"] for v in pres.values()) / len(pres)
    kept = sum(v["model"] for v in pres.values()) / len(pres)
    nb = sorted({w for ws in risk.values() for w in ws if w in pres})
    row = {
        "list": args.list, "name": args.name, "method": overrides, "n": args.n,
        "total_acc": round(m["forgetting"]["total_acc"], 4), "per_concept": m["forgetting"]["per_concept"],
        "kept": round(kept, 4), "kept_base": round(kept_base, 4), "kept_drop": round(100 * (kept_base - kept), 2),
        "neighbours_drop": round(100 * sum(pres[w]["base"] - pres[w]["model"] for w in nb) / len(nb), 2),
        "neighbours": {w: [pres[w]["base"], pres[w]["model"]] for w in nb},
        "coherence": round(sum(v["model"] for v in m["superclass_coherence"].values())
                           / len(m["superclass_coherence"]), 4),
        "erase_s": round(erase_s),
    }
    print(json.dumps(row), flush=True)
    with open(Path(args.out) / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
