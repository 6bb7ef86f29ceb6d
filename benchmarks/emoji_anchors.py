"""Which superclass images should an emoji erasure train on? (the demo's anchor rule)

    python benchmarks/emoji_anchors.py [--n 32] [--family]

For each of the ten targets, draws N images of its superclass prompt ("a photo of a dog") the way
`sculpt.data` draws anchor images (DDIM 20 steps, guidance 4.0, image i from seed i), once without a
negative prompt and once with the concept as negative prompt (the paper's setting), and prints the
share the emoji classifier calls the concept itself and the share it calls another member of the
superclass. `sculpt.emoji.demo.ANCHOR_WITHOUT_NEGATIVE` is decided from this table (docs/results.md).

--family: the same for the weapons family (`sculpt demo --unsafe`) and its anchor "tool" (the Unicode
subgroup of most of its members): the share of "a photo of a tool" pictures the classifier calls any
weapon, and the share it calls a tool, with and without "weapon" as negative prompt.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--family", action="store_true", help="the weapons family and its anchor instead")
    args = ap.parse_args()

    from sculpt.emoji.classifier import load_classifier
    from sculpt.emoji.dataset import class_prompt
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.eval.sampling import Job, SamplerSettings, generate
    from sculpt.models.loading import load_pipeline, model_hash

    tax, clf, pipe = load_taxonomy(), load_classifier(), load_pipeline("emoji")
    mhash = model_hash(pipe)
    if args.family:
        from sculpt.emoji.demo import UNSAFE_ANCHOR, UNSAFE_FAMILY

        weapons = torch.tensor([w.id for w in tax.weapons])
        tools = torch.tensor([m.id for m in tax.members_of(UNSAFE_ANCHOR)])
        jobs = [Job(class_prompt(UNSAFE_ANCHOR), seed) for seed in range(args.n)]
        for label, negative in (("no negative", ""), (f"'{UNSAFE_FAMILY}' as negative", UNSAFE_FAMILY)):
            pred = clf.predict(generate(pipe, jobs, SamplerSettings(steps=20, guidance=4.0, negative_prompt=negative),
                                        mhash)).argmax(-1)
            print(f"{UNSAFE_FAMILY} -> {UNSAFE_ANCHOR}, {label}: "
                  f"{json.dumps({'weapons': round(torch.isin(pred, weapons).float().mean().item(), 3), UNSAFE_ANCHOR: round(torch.isin(pred, tools).float().mean().item(), 3)})}",
                  flush=True)
        return
    for t in tax.targets:
        members = torch.tensor([m.id for m in tax.members_of(t.superclass) if m.id != t.id])
        jobs = [Job(class_prompt(t.superclass), seed) for seed in range(args.n)]
        row = {}
        for label, negative in (("no negative", ""), ("concept as negative", t.name)):
            settings = SamplerSettings(steps=20, guidance=4.0, negative_prompt=negative)
            pred = clf.predict(generate(pipe, jobs, settings, mhash)).argmax(-1)
            row[label] = {"concept": round((pred == t.id).float().mean().item(), 3),
                          "other members": round(torch.isin(pred, members).float().mean().item(), 3)}
        print(f"{t.name:>18} -> {t.superclass:<18} {json.dumps(row)}", flush=True)


if __name__ == "__main__":
    main()
