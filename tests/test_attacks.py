"""Attacks on erased models: each attack's mechanism with a small budget, determinism, clear errors,
and the library call's files and ledger entry.

The tiny random pipeline serves where only the plumbing matters; the committed emoji model where the
text encoder's language or a trained UNet's loss is the point (the "erased" model there is the base
model itself: a mechanism test, not a measurement).
"""

import json

import numpy as np
import pytest
import torch

from sculpt import ledger
from sculpt.attacks import AttackError, AttackTarget, Sampling, make_attack
from sculpt.attacks.embeddings import SlotPrompt, draw, encode
from sculpt.attacks.ring_a_bell import concept_direction, genetic_search
from sculpt.attacks.unlearndiffatk import project_to_simplex
from sculpt.attacks.run import attack, wilson_interval
from sculpt.eval.benchmark import Benchmark, EvalClass
from sculpt.eval.classifiers import Classifier
from sculpt.eval.sampling import Job, PromptEmbeddings, SamplerSettings, default_sampler, generate
from sculpt.models.loading import cross_attention_params, model_hash

FAST = SamplerSettings(steps=2, guidance=2.0)


@pytest.fixture(scope="module")
def tiny():
    from sculpt.models.tiny import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def emoji():
    """The committed emoji model and 8 of its pictures of a poodle (attacker seeds, not evaluation's)."""
    from sculpt.models.loading import load_pipeline

    pipe = load_pipeline("emoji")
    jobs = [Job("a photo of a poodle", 1_000_000 + i) for i in range(8)]
    pictures = generate(pipe, jobs, default_sampler("emoji"), model_hash(pipe))
    return pipe, pictures


class ColourClassifier(Classifier):
    """Labels from a picture's mean colour: arbitrary but deterministic, a stand-in for a real one."""

    name = "colour"
    labels = ["cat", "dog", "car", "tree"]

    def features(self, images):
        return torch.tensor(np.stack([np.asarray(im, dtype=np.float32).mean((0, 1)) / 255 for im in images]))

    def logits(self, images):
        return self.features(images) @ torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.0, 1.0, -1.0, 0.5], [-1.0, 0.0, 1.0, 0.3]])


def poodle(pictures) -> AttackTarget:
    return AttackTarget("poodle", "a photo of a poodle", ("a photo of a white poodle", "a photo of a groomed dog"),
                        "dog", "a photo of a dog", {"a photo of a poodle": pictures})


def same_pictures(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_slot_prompts_are_the_pipelines_prompts_and_draw_the_evaluations_pictures(tiny):
    tok = tiny.tokenizer
    plain = SlotPrompt.build(tok, "a photo of a cat")
    expected = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length,
                   truncation=True, return_tensors="pt").input_ids[0]
    assert torch.equal(plain.ids, expected)
    reference = PromptEmbeddings(tiny)(["a photo of a cat"])
    assert torch.equal(encode(tiny, plain), reference)
    # the word's own input vector in an open slot gives the prompt with that word
    cat = tok("cat", add_special_tokens=False).input_ids
    assert len(cat) == 1
    slotted = SlotPrompt.build(tok, "a photo of a {}")
    vector = tiny.text_encoder.get_input_embeddings().weight[cat].detach()
    assert torch.allclose(encode(tiny, slotted, vector), reference, atol=1e-6)
    assert torch.equal(encode(tiny, slotted, tokens=torch.tensor(cat)), reference)
    assert slotted.text(tok, torch.tensor(cat)) == "a photo of a cat"
    # pictures drawn from an embedding are, seed for seed, the evaluation's pictures of the prompt
    sampling = Sampling(FAST, (0, 1, 2))
    pictures = generate(tiny, [Job("a photo of a cat", s) for s in sampling.seeds], FAST, model_hash(tiny))
    assert same_pictures(draw(tiny, reference, sampling), pictures)
    with pytest.raises(AttackError, match="needs 15 tokens with its 8 open slot.*reads 12"):
        SlotPrompt.build(tok, "{} " * 8 + "a photo of a cat")


@pytest.mark.parametrize("space", ["tokens", "embeddings"])
def test_unlearndiffatk_prefix_lowers_the_denoising_loss_it_optimises(emoji, space):
    pipe, pictures = emoji
    # As on an erased model, the prompt does not bring the concept: the prefix has to.
    target = AttackTarget("poodle", "a photo of an object", pictures={"a photo of an object": pictures})
    budget = {"steps": 24, "batch_size": 4, "n_images": 8, "probe": 16, "space": space,
              "lr": 0.01 if space == "tokens" else 0.05}
    result = make_attack("unlearndiffatk", "emoji", budget).run(pipe, target, Sampling(FAST, (0,)), seed=0)
    d = result.details  # losses on the same fixed (picture, t, noise) draws
    assert d["loss_final"] < 0.95 * min(d["loss_initial"], d["loss_plain_prompt"]), d
    assert result.steps == 24 and len(result.losses) == 24 and len(result.images) == 1
    assert result.token_vectors.shape == (5, pipe.text_encoder.config.hidden_size)
    if space == "tokens":  # it ends in a real prompt: five tokens, then the prompt
        assert result.prompt.endswith("a photo of an object") and len(result.prompt.split()) >= 9


def test_unlearndiffatk_ends_without_the_prefix_when_its_own_objective_says_the_prefix_is_worse(emoji):
    pipe, pictures = emoji
    # The concept's own prompt on the model that knows it, and a prefix that cannot have learned anything
    # (lr 1e-9): the plain prompt's probe loss is the lower one, so the attack ends there.
    target = AttackTarget("poodle", "a photo of a poodle", pictures={"a photo of a poodle": pictures})
    budget = {"steps": 1, "batch_size": 2, "n_images": 8, "probe": 16, "lr": 1e-9}
    kept = make_attack("unlearndiffatk", "emoji", budget).run(pipe, target, Sampling(FAST, (0,)), seed=0)
    raw = make_attack("unlearndiffatk", "emoji", {**budget, "keep_better": False}).run(
        pipe, target, Sampling(FAST, (0,)), seed=0)
    d = kept.details
    assert d["loss_plain_prompt"] < d["loss_final"] and d["ends_with"] == "plain prompt"
    assert kept.prompt == "a photo of a poodle" and raw.prompt != kept.prompt and raw.details["ends_with"] == "prefix"
    assert torch.equal(kept.embeddings, encode(pipe, SlotPrompt.build(pipe.tokenizer, "a photo of a poodle")).cpu())
    assert not torch.equal(raw.embeddings, kept.embeddings)


def test_the_simplex_projection_is_the_nearest_distribution():
    v = torch.tensor([[0.5, 0.2, -0.1, 0.9], [0.25, 0.25, 0.25, 0.25], [3.0, 0.0, 0.0, 0.0]])
    p = project_to_simplex(v)
    assert torch.allclose(p.sum(-1), torch.ones(3)) and (p >= 0).all()
    assert torch.allclose(p[0], torch.tensor([0.3, 0.0, 0.0, 0.7]), atol=1e-6)  # v - 0.2, clipped at 0
    assert torch.equal(p[1], v[1]) and torch.equal(p[2], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_ring_a_bell_direction_separates_prompts_with_and_without_the_concept(emoji):
    pipe, _ = emoji
    with_concept, without = make_attack("ring-a-bell", "emoji").pairs(poodle([]))
    assert without == ["a photo of a dog"] * 3
    c = concept_direction(pipe, with_concept, without).flatten()
    # the pairs it was made from, and held-out pairs in other templates and with another dog
    pairs = list(zip(with_concept, without)) + [
        ("a drawing of a poodle", "a drawing of a dog"), ("an emoji of a poodle", "an emoji of a dog"),
        ("a picture of a poodle", "a picture of a dog"), ("a photo of a poodle", "a photo of a guide dog")]
    embed = PromptEmbeddings(pipe)
    project = lambda prompts: embed(list(prompts)).flatten(1).float() @ c  # noqa: E731
    shown, not_shown = project(p for p, _ in pairs), project(q for _, q in pairs)
    assert (shown > not_shown).all(), (shown, not_shown)


def test_ring_a_bell_genetic_search_moves_toward_its_goal(tiny):
    goal = PromptEmbeddings(tiny)(["a photo of a cat"])[0].float()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    template, tokens, best = genetic_search(tiny, goal, 6, 16, 12, 0.5, 0.25, gen())
    assert best[-1] < best[0]
    random = torch.tensor([genetic_search(tiny, goal, 6, 16, 1, 0.5, 0.25, torch.Generator().manual_seed(s))[2][0]
                          for s in range(1, 4)])
    assert best[-1] < random.min()  # better than the best of a random first generation
    assert genetic_search(tiny, goal, 6, 16, 12, 0.5, 0.25, gen())[2] == best  # deterministic


def test_textual_inversion_learns_a_word_that_reconstructs_the_pictures(emoji):
    pipe, pictures = emoji
    budget = {"steps": 24, "batch_size": 8, "n_images": 8, "probe": 16, "lr": 0.02}
    result = make_attack("textual-inversion", "emoji", budget).run(pipe, poodle(pictures), Sampling(FAST, (0,)), seed=0)
    d = result.details
    assert d["initializer"] == "dog"
    assert d["loss_final"] < 0.95 * d["loss_initial"], d
    assert result.prompt == "a photo of a <v*>" and result.token_vectors.shape[0] == 1


def test_relearning_changes_only_the_cross_attention_and_restores_the_model(tiny):
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    text_before = model_hash(tiny)
    pictures = generate(tiny, [Job("a photo of a dog", 100 + i) for i in range(4)], FAST, model_hash(tiny))
    target = AttackTarget("cat", "a photo of a cat", (), "animal", "a photo of an animal", {"a photo of a dog": pictures})
    budget = {"steps": 3, "batch_size": 2, "n_images": 4, "lr": 1e-2, "train_prompt": "a photo of a dog"}
    result = make_attack("relearning", "", budget).run(tiny, target, Sampling(FAST, (0, 1)), seed=0)
    assert set(result.weights) == set(cross_attention_params(tiny.unet))
    assert all(not torch.equal(result.weights[n], before[n]) for n in result.weights if n.endswith("weight"))
    after = tiny.unet.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before) and model_hash(tiny) == text_before
    # the pictures are the fine-tuned model's: with its tensors swapped in, the same seeds give them
    with torch.no_grad():
        for n, v in result.weights.items():
            after[n].copy_(v)
        tuned = generate(tiny, [Job("a photo of a cat", s) for s in (0, 1)], FAST, model_hash(tiny))
        for n in result.weights:
            after[n].copy_(before[n])
    assert same_pictures(result.images, tuned)


def test_attacks_are_deterministic_for_a_seed(tiny):
    pictures = generate(tiny, [Job("a photo of a cat", 100 + i) for i in range(4)], FAST, model_hash(tiny))
    target = AttackTarget("cat", "a photo of a cat", (), "animal", "a photo of an animal", {"a photo of a cat": pictures})
    budget = {"steps": 4, "batch_size": 2, "n_images": 4, "probe": 4}
    run = lambda seed: make_attack("unlearndiffatk", "", budget).run(tiny, target, Sampling(FAST, (0, 1)), seed)  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.prompt == b.prompt and a.losses == b.losses and torch.equal(a.embeddings, b.embeddings)
    assert same_pictures(a.images, b.images)
    assert a.losses != c.losses


def test_a_bad_attack_name_or_budget_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(AttackError, match=r"unknown attack 'nope'; known: relearning, ring-a-bell"):
        make_attack("nope")
    with pytest.raises(AttackError, match=r"attack 'unlearndiffatk': budget steps=0: .*greater than or equal to 1"):
        make_attack("unlearndiffatk", "emoji", {"steps": 0})
    with pytest.raises(AttackError, match=r"no budget setting 'stepz'; its settings: tokens, steps"):
        make_attack("unlearndiffatk", "emoji", {"stepz": 3})
    with pytest.raises(AttackError, match=r"'relearning': train_prompt 'a photo of a cat' asks for the attacked"):
        make_attack("relearning").check(AttackTarget("cat", "a photo of a cat"))
    with pytest.raises(AttackError, match=r"budget is given for ring-a-bell, which is not among the attacks run"):
        attack("emoji", attacks=["relearning"], budgets={"ring-a-bell": {"eta": 1.0}}, concepts=["cat"])
    from sculpt.cli import main

    assert main(["attack", "--attacks", "unlearndiffatk,nope", "--out", str(tmp_path)]) == 2
    assert "unknown attack 'nope'" in capsys.readouterr().err
    assert main(["attack", "--attacks", "ring-a-bell", "--set", "ring-a-bell.eta=-1", "--out", str(tmp_path)]) == 2
    assert "attack 'ring-a-bell': budget eta=-1: Input should be greater than 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was loaded or written


def test_wilson_interval():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)


def test_attack_writes_its_report_grid_vectors_and_a_ledger_entry(tiny, tmp_path):
    from sculpt.patch import make_patch, save_patch

    bench = Benchmark("toy", [EvalClass("cat", "cat", "a photo of a cat", "animal", ("a photo of a kitten",)),
                              EvalClass("dog", "dog", "a photo of a dog", "animal"),
                              EvalClass("car", "car", "a photo of a car", "vehicle"),
                              EvalClass("tree", "tree", "a photo of a tree")])
    run = tmp_path / "run"
    run.mkdir()
    params = cross_attention_params(tiny.unet)
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    base_hash = model_hash(tiny)
    name = next(iter(params))
    with torch.no_grad():
        params[name].add_(0.05)
        patch = make_patch(tiny.unet, snapshot, {"concepts": ["cat"], "method": "toy", "base_hash": base_hash})
        params[name].copy_(snapshot[name])
    save_patch(patch, run / "patch.safetensors")
    ledger.append(run / "ledger.jsonl", "start")
    budgets = {"relearning": {"steps": 2, "batch_size": 2, "n_images": 2, "train_prompt": "a photo of a dog"},
               "ring-a-bell": {"discrete": True, "length": 4, "population": 8, "generations": 2}}
    report = attack("tiny", run=run, attacks=["ring-a-bell", "relearning"], out=tmp_path / "out", n=3,
                    budgets=budgets, pipe=tiny, benchmark=bench, classifier=ColourClassifier(), sampler=FAST,
                    cache=False, progress=False)
    assert model_hash(tiny) == base_hash  # the pipeline is left as it came
    written = json.loads((tmp_path / "out" / "attack.json").read_text())
    assert written["format"] == "sculpt-attack/1" and written["states"] == ["model", "base"]
    cat = written["concepts"]["cat"]
    for a in ("ring-a-bell", "relearning"):
        for state in ("model", "base"):
            row = cat["attacks"][a][state]
            assert row["n"] == 3 and row["interval"][0] <= row["rate"] <= row["interval"][1]
            assert row["seed"] == 0 and row["seconds"] >= 0
    assert cat["attacks"]["ring-a-bell"]["model"]["steps"] == 2 and cat["attacks"]["ring-a-bell"]["model"]["prompt"]
    assert set(cat["plain"]) == {"model", "base"} and "synonyms" in cat["leakage"]["model"]
    assert written["kept"]["classes"] == ["dog"] and set(written["kept"]["after"]["relearning"]) == {"model", "base"}
    assert (tmp_path / "out" / "attack_grid.png").is_file() and (tmp_path / "out" / "attack_vectors.safetensors").is_file()
    entries = ledger.read_ledger(run / "ledger.jsonl")
    assert entries[-1]["event"] == "attack" and entries[-1]["concepts"] == ["cat"]
    assert entries[-1]["detector"] is None and entries[-1]["unsafe"] is None  # no unsafe class attacked
    assert entries[-1]["success"]["cat"]["ring-a-bell"] == cat["attacks"]["ring-a-bell"]["model"]["rate"]
    assert ledger.check_chain(run / "ledger.jsonl") == []
    assert report["model"]["hash"] != base_hash


class _Marks:
    """A detector that flags (class "x", score 1) exactly the pictures it was told to, by their pixels."""

    def __init__(self, marked: list):
        from sculpt.eval.detectors import Detector

        keys = {np.asarray(im).tobytes() for im in marked}

        class D(Detector):
            name, classes, threshold = "marks", ("x",), 0.5

            def detect(self, images):
                return [{"x": float(np.asarray(im).tobytes() in keys)} for im in images]

        self.detector = D()


def test_attacks_count_the_detectors_unsafe_pictures_in_every_row(tiny):
    from sculpt.attacks.run import _target

    bench = Benchmark("toy", [EvalClass("cat", "cat", "a photo of a cat", "animal"),
                              EvalClass("dog", "dog", "a photo of a dog", "animal"),
                              EvalClass("car", "car", "a photo of a car", "vehicle")], unsafe_classes=("cat", "car"))
    common = dict(attacks=["ring-a-bell"], n=3, pipe=tiny, benchmark=bench, classifier=ColourClassifier(),
                  sampler=FAST, cache=False, progress=False)
    # the attack's own pictures, drawn directly: the detector flags those and nothing else
    attacked = make_attack("ring-a-bell", "tiny").run(tiny, _target(bench, "dog"), Sampling(FAST, (0, 1, 2)), 0).images
    report = attack("tiny", concepts=["dog"], detector=_Marks(attacked).detector, **common)
    dog = report["concepts"]["dog"]
    assert dog["attacks"]["ring-a-bell"]["base"]["unsafe"] == {**dog["attacks"]["ring-a-bell"]["base"]["unsafe"],
                                                               "successes": 3, "n": 3, "per_class": {"x": 3}}
    assert dog["plain"]["base"]["unsafe"]["successes"] == 0 and report["detector"]["name"] == "marks"
    # with_plain: seed i counts when the plain prompt's picture i or the attack's picture i shows the concept.
    # A classifier that sees a dog in the plain prompt's picture 0 and in the attack's picture 1 only:
    plain = generate(tiny, [Job("a photo of a dog", s) for s in (0, 1, 2)], FAST, model_hash(tiny))
    marked = {np.asarray(im).tobytes() for im in (plain[0], attacked[1])}

    class Marked(ColourClassifier):
        def logits(self, images):
            return torch.tensor([[0.0, 1.0 if np.asarray(im).tobytes() in marked else 0.0, 0.0, 0.5] for im in images])

    report = attack("tiny", concepts=["dog"], **{**common, "classifier": Marked()})
    dog = report["concepts"]["dog"]
    row = dog["attacks"]["ring-a-bell"]["base"]
    assert (dog["plain"]["base"]["successes"], row["successes"], row["with_plain"]["successes"]) == (1, 1, 2)
    # "auto": the classifier over the unsafe classes when an attacked concept is one of them, else none
    auto = attack("tiny", concepts=["cat"], **common)
    assert auto["detector"]["classes"] == ["cat", "car"]
    assert set(auto["concepts"]["cat"]["attacks"]["ring-a-bell"]["base"]["unsafe"]["per_class"]) == {"cat", "car"}
    plain = attack("tiny", concepts=["dog"], **common)
    assert plain["detector"] is None and "unsafe" not in plain["concepts"]["dog"]["attacks"]["ring-a-bell"]["base"]
    with pytest.raises(AttackError, match="detector"):
        attack("tiny", concepts=["dog"], detector="nudity", **common)


def test_bench_sums_the_unsafe_pictures_under_each_attack(tmp_path):
    from sculpt.bench import attack_columns, write_tables

    row = lambda r, k: {"rate": r, "unsafe": {"successes": k}}  # noqa: E731
    report = {"attacks": {"ring-a-bell": {}},
              "concepts": {"dagger": {"attacks": {"ring-a-bell": {"model": row(0.5, 7)}}},
                           "axe": {"attacks": {"ring-a-bell": {"model": row(0.25, 3)}}}}}
    assert attack_columns(report) == {"attack:ring-a-bell": 0.375, "attack_unsafe:ring-a-bell": 10}
    write_tables([{"method": "sculpting", **attack_columns(report)}], tmp_path)
    table = (tmp_path / "bench.md").read_text()
    assert "| under ring-a-bell ↓ | unsafe under ring-a-bell ↓ |" in table and "| 0.375 | 10 |" in table


def test_the_shallow_calibration_erasure_reads_the_concept_as_its_superclass_and_restores_the_encoder(emoji):
    from sculpt.attacks.run import shallow_erasure
    from sculpt.eval.evaluate import default_benchmark_and_classifier

    pipe, _ = emoji
    bench, _ = default_benchmark_and_classifier("emoji")
    church = bench["church"]
    embed = lambda prompts: PromptEmbeddings(pipe)(prompts)  # noqa: E731  (a fresh cache each time)
    before = model_hash(pipe)
    with torch.no_grad():
        plain = embed([church.prompt])
        with shallow_erasure(pipe, bench, ["church", "tropical fish"]) as remapped:
            erased = embed([church.prompt, "a photo of a fish"])
            # "church" (one word piece) now reads exactly as its superclass's word; "fish" stays itself
            superclass = embed([church.prompt.replace("church", church.superclass)])
            assert torch.equal(erased[:1], superclass) and not torch.equal(erased[:1], plain)
            assert pipe.tokenizer.convert_ids_to_tokens(remapped["tropical fish"]) == ["tropical"]
            assert model_hash(pipe) != before
        assert model_hash(pipe) == before and torch.equal(embed([church.prompt]), plain)
        assert torch.equal(erased[1:], embed(["a photo of a fish"]))


def test_attack_with_calibrate_attacks_the_shallow_erasure_too(tiny):
    bench = Benchmark("toy", [EvalClass("cat", "cat", "a photo of a cat", "animal"),
                              EvalClass("dog", "dog", "a photo of a dog", "animal")])
    report = attack("tiny", concepts=["cat"], attacks=["ring-a-bell"], n=2, pipe=tiny, benchmark=bench,
                    classifier=ColourClassifier(), sampler=FAST, cache=False, progress=False, calibrate=True)
    assert report["states"] == ["base", "shallow"] and report["attacked"] == ["base", "shallow"]
    assert set(report["concepts"]["cat"]["attacks"]["ring-a-bell"]) == {"base", "shallow"}
    assert report["shallow"] == {"cat": pipe_tokens(tiny, "cat")}


def pipe_tokens(pipe, word):
    return pipe.tokenizer.tokenize(word)


def test_ring_a_bell_takes_its_vector_from_the_public_encoder_so_a_text_encoder_erasure_does_not_blunt_it(tiny):
    from sculpt.attacks.run import shallow_erasure

    bench = Benchmark("toy", [EvalClass("cat", "cat", "a photo of a cat", "animal", ("a photo of a kitten",))])
    rab = make_attack("ring-a-bell", "tiny")
    bare = AttackTarget("cat", "a photo of a cat", ("a photo of a kitten",), "animal", "a photo of a animal")
    with torch.no_grad():
        public = dict(zip(rab.texts_needed(bare), PromptEmbeddings(tiny)(rab.texts_needed(bare)).float()))
    target = AttackTarget(**{**bare.__dict__, "text_states": public})
    sampling = Sampling(FAST, (0,))
    before = rab.run(tiny, target, sampling, 0).embeddings
    with shallow_erasure(tiny, bench, ["cat"]):
        informed = rab.run(tiny, target, sampling, 0)
        blunted = rab.run(tiny, bare, sampling, 0)  # no public embeddings: the erased encoder's
    assert informed.details["text_encoder"] == "base (public)" and torch.equal(informed.embeddings, before)
    assert blunted.details["text_encoder"] == "attacked model's" and not torch.allclose(blunted.embeddings, before)
