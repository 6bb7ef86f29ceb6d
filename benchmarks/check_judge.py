"""Can the emoji scorer stand in as the presence check's judge? (issue 25)

    python benchmarks/check_judge.py [--n 16]

Draws n pictures of each of the 62 class prompts with the base model (the evaluation's sampler, the
check's seeds sculpt.presence.CHECK_SEED + i) and prints how often the evaluation's classifier and the
scorer (zero-shot over the class prompts, sculpt.presence.ScorerJudge) name the prompted class, how
often they agree, and the classes the scorer recognises least.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()

    from sculpt.emoji.dataset import class_prompt
    from sculpt.emoji.scorer import load_scorer
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.eval.classifiers import EmojiWorldClassifier
    from sculpt.eval.sampling import EMOJI_SAMPLER, Job, generate
    from sculpt.models.loading import load_pipeline, model_hash
    from sculpt.presence import CHECK_SEED

    pipe, tax = load_pipeline("emoji"), load_taxonomy()
    names = tax.names
    images = generate(pipe, [Job(class_prompt(n), CHECK_SEED + i) for n in names for i in range(args.n)],
                      EMOJI_SAMPLER, model_hash(pipe))
    truth = [n for n in names for _ in range(args.n)]
    clf = EmojiWorldClassifier()
    by_clf = [clf.labels[i] for i in clf.predict(images).tolist()]
    sims = load_scorer().similarity(images, [class_prompt(n) for n in names])
    by_scorer = [names[i] for i in sims.argmax(-1).tolist()]
    share = lambda pairs: round(sum(a == b for a, b in pairs) / len(truth), 4)  # noqa: E731
    per_class = {n: sum(by_scorer[i] == n for i in range(len(truth)) if truth[i] == n) / args.n for n in names}
    print(json.dumps({"pictures": len(truth), "classifier_acc": share(zip(by_clf, truth)),
                      "scorer_acc": share(zip(by_scorer, truth)), "agree": share(zip(by_clf, by_scorer)),
                      "scorer_lowest": dict(sorted(per_class.items(), key=lambda kv: kv[1])[:5])}))


if __name__ == "__main__":
    main()
