"""Does the bundled emoji model draw what it is asked? (issue 3's quality bar)

    python benchmarks/emoji_quality.py [--n 50] [--seed 0]

Prints classifier top-1 on N generated images per class prompt (mean over the ten targets and over
all classes) and, for each target's superclass prompt ("a photo of a fish"), the share of images the
classifier puts in a member class of that superclass. Same sampler as `sculpt eval` on emoji
(DDIM 25 steps, guidance 4.0), image i from seed + i.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args()

    from sculpt.emoji.classifier import load_classifier
    from sculpt.emoji.dataset import class_prompt
    from sculpt.emoji.pipeline import load_emoji_pipeline
    from sculpt.emoji.taxonomy import load_taxonomy

    tax, clf, pipe = load_taxonomy(), load_classifier(), load_emoji_pipeline()

    def predict(prompt: str) -> torch.Tensor:
        # Image i starts from its own noise (seed + i), as in `sculpt eval`; one batched call.
        latents = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(args.seed + i))
                             for i in range(args.n)])
        images = pipe([prompt] * args.n, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      latents=latents, output_type="pt").images
        return clf.predict(images).argmax(-1)

    per_class = {c.name: (predict(class_prompt(c.name)) == c.id).float().mean().item() for c in tax.classes}
    superclass = {}
    for t in tax.targets:
        members = torch.tensor([m.id for m in tax.members_of(t.superclass)])
        superclass[t.superclass] = torch.isin(predict(class_prompt(t.superclass)), members).float().mean().item()
    report = {
        "n": args.n, "seed": args.seed,
        "targets_mean": sum(per_class[t] for t in tax.target_names) / len(tax.target_names),
        "all_classes_mean": sum(per_class.values()) / len(per_class),
        "superclass_prompt_member_share": superclass,
        "superclass_mean": sum(superclass.values()) / len(superclass),
        "per_class": per_class,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
