"""A short erasure on the committed emoji model: the target is forgotten, a distant class is kept."""

import pytest
import torch

from sculpt.emoji.pipeline import PIPELINE_DIR

pytestmark = pytest.mark.skipif(not (PIPELINE_DIR / "model_index.json").exists(),
                                reason="no committed emoji pipeline yet: run scripts/emoji_train.sh")

TARGET, DISTANT = "tropical fish", "cat"


def accuracy(pipe, classifier, name, n=16, seed=0):
    from sculpt.emoji.dataset import class_prompt
    from sculpt.emoji.taxonomy import load_taxonomy

    g = torch.Generator().manual_seed(seed)
    images = pipe([class_prompt(name)] * n, num_inference_steps=20, guidance_scale=4.0, generator=g,
                  output_type="pt").images
    with torch.no_grad():
        pred = classifier.predict(images).argmax(-1)
    return (pred == load_taxonomy()[name].id).float().mean().item()


def test_erasing_one_target_lowers_it_and_keeps_a_distant_class(tmp_path):
    from sculpt.emoji.classifier import load_classifier
    from sculpt.emoji.demo import demo_spec
    from sculpt.emoji.pipeline import load_emoji_pipeline
    from sculpt.erase import erase

    classifier = load_classifier()
    base = load_emoji_pipeline()
    before = accuracy(base, classifier, TARGET), accuracy(base, classifier, DISTANT)
    cfg = demo_spec([TARGET], tmp_path / "run")
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.n_images = 16
    result = erase(cfg, pipe=base, progress=False)
    after = accuracy(result.pipe, classifier, TARGET), accuracy(result.pipe, classifier, DISTANT)
    assert before[0] >= 0.5, f"the base model does not draw a {TARGET} ({before[0]:.2f})"
    assert after[0] <= before[0] - 0.4, f"{TARGET}: {before[0]:.2f} -> {after[0]:.2f}"
    assert after[1] >= before[1] - 0.2, f"{DISTANT}: {before[1]:.2f} -> {after[1]:.2f}"
    # The stage ended on the emoji world's presence check (its scorer, never the evaluation's classifier):
    # extra rounds only while the share was above the bar, and the summary agrees with the last share.
    check = result.stages[0]["check"]
    shares = [s[TARGET] for s in check["shares"]]
    assert check["judge"] == "emoji scorer (zero-shot)" and check["extra_rounds"] == len(shares) - 1
    assert all(s > check["max_share"] for s in shares[:-1]) and check["gone"] == (shares[-1] <= check["max_share"])


def test_a_stage_too_short_to_forget_goes_on_until_the_check_passes_or_says_it_could_not(tmp_path):
    """On the committed model with a budget far below the demo's (6 steps), the emoji world's check
    still finds tropical fish drawn: the stage trains extra rounds of 6 steps while it does, and its
    summary counts them; the share the check reports falls from the first check to the last."""
    from sculpt.emoji.demo import demo_spec
    from sculpt.emoji.pipeline import load_emoji_pipeline
    from sculpt.erase import erase

    cfg = demo_spec([TARGET], tmp_path / "run", method={"epochs": 1, "steps_per_epoch": 6, "warmup_steps": 4})
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.n_images = 16
    cfg.check = cfg.check.model_copy(update={"pictures": 16, "max_rounds": 3})
    stage = erase(cfg, pipe=load_emoji_pipeline(), progress=False).stages[0]
    shares = [s[TARGET] for s in stage["check"]["shares"]]
    assert shares[0] > cfg.check.max_share, f"6 steps already erased it ({shares}): the test needs a shorter budget"
    assert stage["check"]["extra_rounds"] == len(shares) - 1 >= 1 and stage["steps"] == 6 * len(shares)
    assert all(s > cfg.check.max_share for s in shares[:-1])
    assert shares[-1] < shares[0]
