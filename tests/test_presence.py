"""The presence check: a stage ends when its concept is no longer drawn, and says so when it cannot."""

import json

import pytest
import torch

from conftest import tiny_spec
from sculpt.erase import erase
from sculpt.models.loading import cross_attention_params


class Scripted:
    """A presence check that answers from a script: the share it returns at its k-th call."""

    name = "scripted"

    def __init__(self, shares):
        self.shares, self.calls, self.started = list(shares), 0, 0

    def start(self, pipe, concepts, template):
        self.started += 1

    def __call__(self, pipe, concepts, template):
        share = self.shares[min(self.calls, len(self.shares) - 1)]
        self.calls += 1
        return {c.name: share for c in concepts}


def _run(tmp_path, tiny_pipe, monkeypatch, shares, name="run", method=None, **check):
    import sculpt.erase

    script = Scripted(shares)
    monkeypatch.setattr(sculpt.erase, "default_check", lambda model, cfg: script)
    cfg = tiny_spec(tmp_path, concepts=[{"name": "cat", "superclass": "animal"}], method=method,
                    check={"max_rounds": 4, "round_epochs": 1, **check})
    cfg.output = str(tmp_path / name)
    base = {n: p.detach().clone() for n, p in tiny_pipe.unet.state_dict().items()}
    result = erase(cfg, pipe=tiny_pipe, progress=False)
    weights = {n: p.detach().clone() for n, p in cross_attention_params(tiny_pipe.unet).items()}
    tiny_pipe.unet.load_state_dict(base)
    return result, script, weights


def test_a_stage_goes_on_while_the_concept_is_drawn_and_stops_when_it_is_gone(tmp_path, tiny_pipe, monkeypatch):
    """Shares 0.8, 0.5, then 0.0: two extra rounds of S steps each, then the stage ends (a third round
    is never run); the extra rounds train (the weights differ from a stage the check passes at once)."""
    result, script, moved = _run(tmp_path, tiny_pipe, monkeypatch, [0.8, 0.5, 0.0])
    stage = result.stages[0]
    assert script.started == 1 and script.calls == 3
    assert stage["steps"] == 2 * 6 + 2 * 6  # E * S of the published schedule, then two rounds of S
    assert stage["check"]["extra_rounds"] == 2 and stage["check"]["gone"] and stage["check"]["shares"] == [
        {"cat": 0.8}, {"cat": 0.5}, {"cat": 0.0}]
    quick, once, still = _run(tmp_path, tiny_pipe, monkeypatch, [0.0], name="quick")
    assert once.calls == 1 and quick.stages[0]["steps"] == 12 and quick.stages[0]["check"]["extra_rounds"] == 0
    assert any(not torch.equal(moved[n], still[n]) for n in moved)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["still_drawn"] == []


def test_a_stage_that_reaches_its_bound_says_so_everywhere(tmp_path, tiny_pipe, monkeypatch):
    """A concept still drawn after max_rounds: the run finishes and its summary, ledger and model card
    name it; the command line exits with ERASE_INCOMPLETE."""
    from sculpt import ledger

    result, script, _ = _run(tmp_path, tiny_pipe, monkeypatch, [1.0], max_rounds=2)
    check = result.stages[0]["check"]
    assert script.calls == 3 and check["extra_rounds"] == 2 and not check["gone"] and check["remaining"] == ["cat"]
    out = tmp_path / "run"
    assert json.loads((out / "summary.json").read_text())["still_drawn"] == ["cat"]
    final = [e for e in ledger.read_ledger(out / "ledger.jsonl") if e["event"] == "final"][-1]
    assert final["still_drawn"] == ["cat"]
    assert "Still drawn when the run ended: cat" in (out / "MODEL_CARD.md").read_text()


def test_erase_exits_non_zero_when_a_concept_is_still_drawn(tmp_path, tiny_pipe, monkeypatch, capsys):
    import yaml

    import sculpt.cli
    import sculpt.erase
    from sculpt.models.tiny import tiny_pipeline

    model = tmp_path / "tiny-sd"
    tiny_pipeline().save_pretrained(model)
    monkeypatch.setattr(sculpt.erase, "default_check", lambda m, cfg: Scripted([1.0]))
    spec = {"model": str(model), "output": str(tmp_path / "out"), "check": {"max_rounds": 1},
            "method": {"lr": 1e-3, "epochs": 1, "steps_per_epoch": 3, "warmup_steps": 1},
            "data": {"n_images": 2, "num_inference_steps": 2, "batch_size": 2, "cache_dir": str(tmp_path / "c")},
            "concepts": [{"name": "cat", "superclass": "animal"}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert sculpt.cli.main(["erase", str(tmp_path / "spec.yaml"), "--quiet"]) == sculpt.cli.ERASE_INCOMPLETE
    captured = capsys.readouterr()
    assert "still drawn after the last extra round: cat" in captured.err and "forgot nothing" in captured.out


def test_a_method_that_cannot_go_on_still_reports_the_check(tmp_path, tiny_pipe, monkeypatch):
    result, script, _ = _run(tmp_path, tiny_pipe, monkeypatch, [0.6], method={"name": "uce"})
    assert script.calls == 1 and result.stages[0]["check"]["remaining"] == ["cat"]


def test_the_check_never_draws_an_evaluation_seed():
    from sculpt.eval.evaluate import EvalSettings
    from sculpt.presence import CHECK_SEED

    s = EvalSettings()
    assert CHECK_SEED > s.seed + 10_000 * max(s.n, 200)


@pytest.fixture(scope="module")
def emoji_pipe():
    from sculpt.models.loading import load_pipeline

    return load_pipeline("emoji")


def test_the_diffusion_classifier_ranks_the_concept_prompt_first_on_its_own_pictures(emoji_pipe):
    """On base pictures of a tropical fish, the model's denoising error is lowest under its own prompt
    (below its superclass's and unrelated classes'); what the check measures falls once the concept's
    prediction is pulled onto the superclass's (here: the concept prompt replaced by the superclass's)."""
    from sculpt.config import Concept
    from sculpt.data.prepare import encode_prompts
    from sculpt.eval.sampling import EMOJI_SAMPLER, Job, generate
    from sculpt.models.loading import model_hash
    from sculpt.data.prepare import encode_pictures
    from sculpt.presence import CHECK_SEED, DiffusionClassifier, errors

    pipe = emoji_pipe
    images = generate(pipe, [Job("a photo of a tropical fish", CHECK_SEED + i) for i in range(8)], EMOJI_SAMPLER,
                      model_hash(pipe))
    latents = encode_pictures(pipe, images)
    prompts = [f"a photo of a {w}" for w in ("tropical fish", "fish", "poodle", "church", "cat")]
    err = errors(pipe, latents, encode_prompts(pipe, prompts), (100, 300, 500, 700, 900))
    assert int(err.mean(1).argmin()) == 0, err.mean(1)
    check = DiffusionClassifier(EMOJI_SAMPLER, n=8)
    fish = Concept(name="tropical fish", superclass="fish")
    check.start(pipe, [fish], "a photo of a {}")
    assert check(pipe, [fish], "a photo of a {}")["tropical fish"] >= 0.5
    same = Concept(name="tropical fish", superclass="fish", prompts=["a photo of a fish"])
    assert float((check.gaps(pipe, check._state["tropical fish"][0], same, "a photo of a {}") > 0).float().mean()) == 0


def test_a_neighbour_whose_pictures_the_model_reads_as_the_concept_is_not_kept(emoji_pipe):
    """The look-alike rule: "fish" with its own pictures stays a neighbour of tropical fish; the same word
    given tropical fish pictures (a neighbour that draws the concept) is dropped from every list."""
    from types import SimpleNamespace

    from sculpt.config import Concept
    from sculpt.data.neighbours import drop_lookalikes
    from sculpt.eval.sampling import EMOJI_SAMPLER, Job, generate
    from sculpt.models.loading import model_hash
    from sculpt.data.prepare import encode_pictures

    pipe = emoji_pipe
    h = model_hash(pipe)

    def latents(prompt):
        return encode_pictures(pipe, generate(pipe, [Job(prompt, 500 + i) for i in range(8)], EMOJI_SAMPLER, h))

    fish, tropical = latents("a photo of a fish"), latents("a photo of a tropical fish")
    concept = Concept(name="tropical fish", superclass="fish")
    other = Concept(name="poodle", superclass="dog")

    def lists():
        return {"tropical fish": [("fish", None), ("cat", None)], "poodle": [("fish", None)]}

    honest = lists()
    assert drop_lookalikes(pipe, honest, [concept], {"fish": SimpleNamespace(latents=fish),
                                                      "cat": SimpleNamespace(latents=latents("a photo of a cat"))},
                           "a photo of a {}") == {}
    assert honest == lists()
    posing = lists()
    dropped = drop_lookalikes(pipe, posing, [concept, other], {"fish": SimpleNamespace(latents=tropical),
                                                                "cat": SimpleNamespace(latents=latents("a photo of a cat"))},
                              "a photo of a {}")
    assert [w for w, _ in dropped["tropical fish"]] == ["fish"]
    assert posing == {"tropical fish": [("cat", None)], "poodle": []}  # gone from every list
