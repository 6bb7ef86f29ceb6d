"""What the anchor rule sees: superclass pictures with and without the concept as negative prompt.

    python benchmarks/emoji_anchors.py [--n 32] [--family] [--concepts a,b,...]

For each concept (default: the ten targets), draws N pictures of its superclass prompt ("a photo of
a dog") the way `sculpt.data` draws anchor pictures (DDIM 20 steps, guidance 4.0, picture i from
seed i), once with the concept as negative prompt (the paper's setting) and once without, and prints
what the emoji classifier makes of them through the anchor rule's judge (sculpt.data.anchors): the
share in the superclass (another class under it) and the share showing the concept itself, and how
many pictures the rule would keep. The rule is applied by `sculpt.data` for every concept when its
data is made; this script only shows its inputs (docs/results.md).

--family: the same for the weapons family (`sculpt demo --unsafe`) and its anchor "tool".
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--family", action="store_true", help="the weapons family and its anchor instead")
    ap.add_argument("--concepts", help="comma-separated classes (default: the ten targets)")
    args = ap.parse_args()

    from sculpt.config import Concept
    from sculpt.data.anchors import SUPERCLASS, default_judge, needs_second_draw, shares
    from sculpt.emoji.dataset import class_prompt
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.eval.sampling import Job, SamplerSettings, generate
    from sculpt.models.loading import load_pipeline, model_hash

    tax, pipe, judge = load_taxonomy(), load_pipeline("emoji"), default_judge("emoji")
    mhash = model_hash(pipe)
    if args.family:
        from sculpt.emoji.demo import UNSAFE_ANCHOR, UNSAFE_FAMILY

        concepts = [Concept(name=UNSAFE_FAMILY, superclass=UNSAFE_ANCHOR, members=list(tax.weapon_names))]
    else:
        names = args.concepts.split(",") if args.concepts else list(tax.target_names)
        concepts = [Concept(name=n, superclass=tax[n].superclass) for n in names]
    for c in concepts:
        jobs = [Job(class_prompt(c.superclass), seed) for seed in range(args.n)]
        row = {}
        for label, negative in (("with_negative", c.name), ("without_negative", "")):
            settings = SamplerSettings(steps=20, guidance=4.0, negative_prompt=negative)
            row[label] = judge(generate(pipe, jobs, settings, mhash), c)
        both = needs_second_draw(row["with_negative"])
        kept = row["with_negative"].count(SUPERCLASS) + (row["without_negative"].count(SUPERCLASS) if both else 0)
        print(f"{c.name:>18} -> {c.superclass:<18} "
              f"{json.dumps({k: shares(v) for k, v in row.items()})} kept {kept}{' (both draws)' if both else ''}",
              flush=True)


if __name__ == "__main__":
    main()
