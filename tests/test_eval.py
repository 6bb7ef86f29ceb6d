"""Evaluation: each metric on a case whose answer is known, the generation cache, the run folder path.

The tiny random pipeline stands in for a real model and a fixed random-projection classifier for the
real classifier (fast, deterministic); one test reads the committed emoji classifier.
"""

import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from sculpt import ledger
from sculpt.eval import metrics as M
from sculpt.eval import sampling
from sculpt.eval.benchmark import Benchmark, EvalClass
from sculpt.eval.classifiers import Classifier
from sculpt.eval.detectors import ClassifierDetector, PromptFileError, read_prompt_csv
from sculpt.eval.evaluate import EvalSettings, evaluate
from sculpt.eval.sampling import ImageCache, Job, SamplerSettings, generate
from sculpt.models.loading import cross_attention_params, model_hash
from sculpt.patch import make_patch, save_patch

FAST = SamplerSettings(steps=2, guidance=2.0)


class StandInClassifier(Classifier):
    """Labels from a fixed random projection of 4x4-pooled pixels: arbitrary but deterministic."""

    name = "stand-in"
    labels = ["cat", "dog", "car", "tree"]

    def __init__(self):
        self.w = torch.randn(48, len(self.labels), generator=torch.Generator().manual_seed(0))

    def features(self, images):
        from sculpt.emoji.images import to_image_batch

        return torch.nn.functional.adaptive_avg_pool2d(to_image_batch(images, 16), 4).flatten(1)

    def logits(self, images):
        f = self.features(images)
        return (f - f.mean(1, keepdim=True)) @ self.w


class StandInScorer:
    """similarity = 100 * mean brightness, whatever the text."""

    def similarity(self, images, texts):
        return torch.tensor([[100 * float(np.asarray(im).mean() / 255)] * len(texts) for im in images])


def noise_pictures(name: str, n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng([seed, len(name)])
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


noise_pictures.fingerprint = "noise-pictures-v1"  # what the metrics cache keys the reference on


def toy_benchmark() -> Benchmark:
    return Benchmark(
        "toy",
        [EvalClass("cat", "cat", "a photo of a cat", "animal", ("a photo of a kitty",), ("a photo of a small feline",)),
         EvalClass("dog", "dog", "a photo of a dog", "animal"),
         EvalClass("car", "car", "a photo of a car", "vehicle", ("a photo of an automobile",)),
         EvalClass("tree", "tree", "a photo of a tree", "plant")],
        targets=["cat"], reference=noise_pictures,
        unsafe_prompts=("something fast",), unsafe_classes=("car",),
    )


def toy_settings(**kw) -> EvalSettings:
    return EvalSettings(**{"n": 6, "n_paraphrase": 3, "n_unsafe": 3, "batch_size": 16, "sampler": FAST, **kw})


def toy_evaluate(pipe, **kw):
    kw.setdefault("settings", toy_settings())
    kw.setdefault("scorer", StandInScorer())
    return evaluate("tiny", pipe=pipe, benchmark=toy_benchmark(), classifier=StandInClassifier(), **kw)


def make_run(folder, pipe, concepts=(("cat",), ("car",))):
    """A sequential erasure run folder written by hand: each stage nudges cross-attention and saves the
    cumulative patch, as sculpt.erase does; then the pipeline is put back as it was."""
    params = cross_attention_params(pipe.unet)
    base = {n: p.detach().clone() for n, p in params.items()}
    base_hash = model_hash(pipe)
    (folder / "stages").mkdir(parents=True)
    done, records = [], []
    g = torch.Generator().manual_seed(1)
    for i, names in enumerate(concepts):
        with torch.no_grad():
            for n, p in params.items():
                if n.endswith("to_k.weight"):
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
        done += names
        patch = make_patch(pipe.unet, base, {"base_hash": base_hash, "result_hash": model_hash(pipe),
                                             "concepts": list(done), "stage": i + 1, "method": "hand"})
        save_patch(patch, folder / "stages" / f"{i + 1:02d}-{'+'.join(names)}.safetensors")
        records += [{"stage": i, "step": s + 1, "L_f": 1.0 / (s + 1), "L_a": 0.1, "L_kd": 0.01 * (s + 1),
                     "loss": 1.2 / (s + 1), "density": 0.5, "turnover": 0.2 / (s + 1)} for s in range(8)]
    save_patch(patch, folder / "patch.safetensors")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps({"method": "hand", "base_hash": base_hash,
                                                     "stages": [{"stage": i + 1} for i in range(len(concepts))]}))
    ledger.append(folder / "ledger.jsonl", "run", base_model="tiny", base_hash=base_hash)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(base[n])
    return folder


# -- generation --------------------------------------------------------------------------------------


def test_pictures_depend_only_on_prompt_and_seed_and_come_back_from_the_cache(tiny_pipe, tmp_path, monkeypatch):
    cache = ImageCache(tmp_path / "cache")
    h = model_hash(tiny_pipe)
    encoded = []
    original = tiny_pipe.encode_prompt
    tiny_pipe.encode_prompt = lambda prompts, *a, **k: (encoded.extend(prompts or []), original(prompts, *a, **k))[1]
    jobs = [Job("a cat", 0), Job("a dog", 1), Job("a cat", 1)]
    first = generate(tiny_pipe, jobs, FAST, h, cache, batch_size=2)
    assert sorted(encoded) == ["", "a cat", "a dog"]  # one text encoding per distinct prompt

    # Alone in its batch, "a cat" with seed 1 is the same picture as inside a mixed batch.
    alone = generate(tiny_pipe, [Job("a cat", 1)], FAST, h, cache=None, batch_size=1)[0]
    diff = np.abs(np.asarray(alone, dtype=int) - np.asarray(first[2], dtype=int))
    assert diff.max() <= 1
    assert np.asarray(first[0]).tolist() != np.asarray(first[2]).tolist()  # seeds matter

    # A second call draws nothing: the cache answers.
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled although every picture is cached")

    monkeypatch.setattr(sampling, "_sample", no_sampling)
    again = generate(tiny_pipe, jobs, FAST, h, cache, batch_size=2)
    assert [np.asarray(a).tolist() for a in again] == [np.asarray(b).tolist() for b in first]
    # Other sampler settings are other pictures: not served from the cache.
    assert FAST.key_data(tiny_pipe) != SamplerSettings(steps=3, guidance=2.0).key_data(tiny_pipe)


# -- metrics on known answers ------------------------------------------------------------------------


def test_unchanged_model_has_zero_preservation_drop(tiny_pipe):
    m = toy_evaluate(tiny_pipe, cache=False)  # no patch; every picture drawn twice, never cached
    assert m["model"]["hash"] == m["model"]["base_hash"]
    assert m["measured"] == ["cat"]  # with nothing erased, the benchmark's targets
    assert m["preservation"]["drop"] == 0.0
    assert all(v["drop"] == 0.0 for v in m["preservation"]["per_class"].values())
    assert m["forgetting"]["total_acc"] == m["forgetting"]["base_total_acc"]
    assert m["quality"]["fid"]["base"] == pytest.approx(m["quality"]["fid"]["model"])
    assert m["unsafe"]["base"] == m["unsafe"]["model"]


def test_emoji_classifier_reports_the_class_it_is_shown():
    from sculpt.emoji.classifier import WEIGHTS_PATH

    if not WEIGHTS_PATH.exists():
        pytest.skip(f"the emoji classifier is not trained yet ({WEIGHTS_PATH})")
    from sculpt.emoji.dataset import render
    from sculpt.eval.classifiers import EmojiWorldClassifier

    clf = EmojiWorldClassifier()
    k_all = range(len(clf.labels))
    pictures = [render(k, 10_000_000 + s) for k in k_all for s in range(2)]
    pred = clf.predict(pictures).view(len(clf.labels), 2)
    accs = [M.top1_accuracy(pred[k], k) for k in k_all]
    assert sum(accs) / len(accs) >= 0.95
    assert min(accs) >= 0.5
    # Labels and FID features from one pass are the two separate passes' results.
    labels, feats = clf.predict_and_embed(pictures)
    assert torch.equal(labels, clf.predict(pictures))
    assert torch.allclose(feats, clf.embed(pictures), atol=1e-5)


def test_clip_scores_of_several_prompts_in_one_call_are_each_groups_mean():
    class Scorer:  # 100 * brightness if the text says "bright", else 0
        calls = 0

        def similarity(self, images, texts):
            Scorer.calls += 1
            b = torch.tensor([float(np.asarray(im).mean() / 255) for im in images])
            return torch.stack([100 * b if "bright" in t else 0 * b for t in texts], dim=1)

    grey = lambda v: Image.new("RGB", (4, 4), (v, v, v))  # noqa: E731
    scores = M.clip_scores(Scorer(), {"bright": [grey(255), grey(0)], "dark": [grey(255)], "empty": []})
    assert scores["bright"] == pytest.approx(50.0) and scores["dark"] == 0.0
    assert scores["empty"] != scores["empty"] and Scorer.calls == 1  # NaN for no pictures; one call


def test_revival_matrix_flags_a_concept_that_comes_back():
    # Columns: base, stage 1 (erases a), stage 2 (erases b), stage 3 (erases c; a comes back).
    acc = [[0.9, 0.0, 0.05, 0.7],
           [0.8, 0.8, 0.0, 0.1],
           [0.9, 0.9, 0.9, 0.0]]
    revived = M.revival(acc, erased_at=[1, 2, 3], threshold=0.2)
    assert revived == [{"concept": 0, "stage": 3, "accuracy": 0.7, "after_erasure": 0.0}]
    assert M.revival(acc, erased_at=[1, 2, 3], threshold=0.8) == []


def test_frechet_distance_of_a_set_with_itself_is_zero_and_of_shifted_sets_the_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, 2.0] + [0.0] * 6)
    assert M.frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-6)  # same covariance: |shift|^2
    b = torch.randn(300, 8, generator=g) * 3
    assert M.frechet_distance(a, b) > 1.0
    # Fewer samples than dimensions (singular covariances) still gives a finite number.
    assert np.isfinite(M.frechet_distance(a[:5], b[:5]))
    assert abs(M.kernel_distance(a, a)) < 0.1 * M.kernel_distance(a, a + 3)


def test_superclass_coherence_and_detection_counts():
    assert M.superclass_coherence([0, 1, 2, 3], member_labels=[0, 1]) == 0.5
    assert M.top1_accuracy(torch.tensor([2, 2, 1, 2]), 2) == 0.75
    counts = M.count_detections([{"A": 0.7, "B": 0.9}, {"A": 0.59}, {}], ["A", "B"], threshold=0.6)
    assert counts == {"A": 1, "B": 1, "any": 1}


def test_classifier_detector_counts_the_classes_it_is_shown():
    clf = StandInClassifier()
    pics = noise_pictures("x", 6, 0)
    top = clf.predict(pics)
    det = ClassifierDetector(clf, ["dog", "car"], threshold=0.0)
    assert len(det.detect(pics)) == 6
    assert M.count_detections(det.detect(pics), det.classes, 0.0)["any"] == 6
    det = ClassifierDetector(clf, [clf.labels[int(top[0])]], threshold=0.5)
    assert det.detect(pics)[0][clf.labels[int(top[0])]] > 0.25


# -- unsafe prompts and NudeNet, without downloads ------------------------------------------------


def test_read_prompt_csv_accepts_i2p_columns_and_names_bad_rows(tmp_path):
    f = tmp_path / "i2p.csv"
    f.write_text("prompt,categories,sd_seed,sd_guidance_scale\n"
                 "a beach,sexual,42,7\n\"a city, at night\",violence,7,9.5\nsomething,sexual,,\n")
    jobs = read_prompt_csv(f)
    assert jobs[0] == Job("a beach", 42, 7.0) and jobs[1] == Job("a city, at night", 7, 9.5)
    assert jobs[2].guidance is None
    assert [j.prompt for j in read_prompt_csv(f, category="sexual")] == ["a beach", "something"]
    (tmp_path / "bad.csv").write_text("text\nhello\n")
    with pytest.raises(PromptFileError, match="no 'prompt' column"):
        read_prompt_csv(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("prompt,seed\nhello,x\n")
    with pytest.raises(PromptFileError, match="bad2.csv:2"):
        read_prompt_csv(tmp_path / "bad2.csv")


def test_nudenet_detector_uses_threshold_and_exposed_classes(monkeypatch):
    from sculpt.eval.detectors import NUDENET_EXPOSED_CLASSES, NudeNetDetector

    class FakeNudeDetector:  # nudenet's API: detect(path) -> [{"class", "score", "box"}]
        def detect(self, path):
            assert path.endswith(".png")
            return [{"class": "FEET_EXPOSED", "score": 0.65, "box": [0, 0, 1, 1]},
                    {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 1, 1]},
                    {"class": "BELLY_EXPOSED", "score": 0.55, "box": [0, 0, 1, 1]}]

    monkeypatch.setitem(sys.modules, "nudenet", types.SimpleNamespace(NudeDetector=FakeNudeDetector))
    det = NudeNetDetector()
    assert det.threshold == 0.6 and len(det.classes) == 8 == len(NUDENET_EXPOSED_CLASSES)
    counts = M.count_detections(det.detect(noise_pictures("x", 2, 0)), det.classes, det.threshold)
    assert counts["FEET_EXPOSED"] == 2 and counts["BELLY_EXPOSED"] == 0 and counts["any"] == 2
    monkeypatch.setitem(sys.modules, "nudenet", None)
    with pytest.raises(ImportError, match="pip install"):
        NudeNetDetector()


def test_the_real_nudenet_runs_offline_and_flags_no_exposed_class_on_an_emoji_face():
    """NudeNet's own ONNX model (shipped in its wheel): it runs without a network, sees a face in the
    emoji world's grinning face, counts no exposed class at the paper's threshold, and says the same
    twice."""
    from sculpt.emoji.dataset import render
    from sculpt.emoji.taxonomy import load_taxonomy
    from sculpt.eval.detectors import NudeNetDetector

    det = NudeNetDetector()
    pictures = [render(load_taxonomy()["grinning face"].id, 3).resize((320, 320))]
    first = det.detect(pictures)
    assert det.detect(pictures) == first
    assert any(label.startswith("FACE_") and score > 0.2 for label, score in first[0].items()), first
    assert M.count_detections(first, det.classes, det.threshold)["any"] == 0


# -- a whole evaluation of a run folder -----------------------------------------------------------


def test_evaluate_run_folder_writes_metrics_with_revival_and_restores_the_model(tiny_pipe, tmp_path):
    run = make_run(tmp_path / "run", tiny_pipe)
    before = model_hash(tiny_pipe)
    m = toy_evaluate(tiny_pipe, run=run, out=run / "eval", cache=tmp_path / "cache")
    assert model_hash(tiny_pipe) == before  # the pipeline is left as it came
    assert m["erased"] == ["cat", "car"] and m["measured"] == ["cat", "car"]
    assert set(m["preservation"]["per_class"]) == {"dog", "tree"}
    assert m["model"]["hash"] != m["model"]["base_hash"]
    assert m["model"]["hash"] == m["model"]["patches"][0]["result_hash"]
    r = m["revival"]
    assert r["concepts"] == ["cat", "car"] and r["erased_at"] == [1, 2]
    assert len(r["accuracy"]) == 2 and all(len(row) == 3 for row in r["accuracy"])
    assert [row[0] for row in r["accuracy"]] == [m["forgetting"]["base_per_concept"][c] for c in r["concepts"]]
    assert [row[-1] for row in r["accuracy"]] == [m["forgetting"]["per_concept"][c] for c in r["concepts"]]
    assert set(m["paraphrase_leakage"]["synonyms"]["per_concept"]) == {"cat", "car"}
    assert set(m["paraphrase_leakage"]["heldout"]["per_concept"]) == {"cat"}
    assert m["unsafe"]["model"]["images"] == 3
    written = json.loads((run / "eval" / "metrics.json").read_text())
    assert written["settings"]["n"] == 6 and written["seeds"]["class_prompts"] == list(range(6))
    assert "torch" in written["versions"] and written["format"] == "sculpt-eval/1"
    assert set(written["samples"]) == {"cat", "car", "dog"}  # erased concepts and a neighbour (dog: animal)
    assert all((run / "eval" / p).is_file() for v in written["samples"].values() for p in v.values())

    # The run's audit ledger records the measured claim (what `sculpt verify --remeasure` re-checks).
    last = ledger.read_ledger(run / "ledger.jsonl")[-1]
    assert last["event"] == "evaluation" and last["total_acc"] == m["forgetting"]["total_acc"]
    assert ledger.check_chain(run / "ledger.jsonl") == []

    # Re-running costs no sampling: every picture comes from the cache, the numbers are the same.
    # (Written outside the run folder: the run's ledger is left alone.)
    again = toy_evaluate(tiny_pipe, run=run, out=tmp_path / "eval2", cache=tmp_path / "cache")
    assert ledger.read_ledger(run / "ledger.jsonl")[-1] == last
    assert again["forgetting"] == m["forgetting"] and again["revival"]["accuracy"] == r["accuracy"]
    assert again["timings"]["sampling"] < max(1.0, 0.5 * m["timings"]["sampling"])


class FingerprintedScorer(StandInScorer):
    """The stand-in scorer with an identity the metrics cache can key on."""

    def fingerprint(self):
        return "brightness-v1"


def test_measurements_are_cached_per_weights_and_measured_again_when_the_model_changes(tiny_pipe, tmp_path, monkeypatch):
    E = sys.modules["sculpt.eval.evaluate"]  # the module (the package exports a function of that name)
    calls = []
    measure = E._measure_state
    monkeypatch.setattr(E, "_measure_state", lambda *a, **k: (calls.append(a[2]), measure(*a, **k))[1])
    kw = dict(scorer=FingerprintedScorer(), cache=tmp_path / "cache")
    first = toy_evaluate(tiny_pipe, out=tmp_path / "e1", **kw)
    assert len(calls) == 1  # no patch: the "patched" state is the base's weights, read back

    again = toy_evaluate(tiny_pipe, out=tmp_path / "e2", **kw)
    assert len(calls) == 1  # nothing measured: both states read back
    assert again["timings"]["metrics_cache_hits"] == 2
    for key in ("forgetting", "preservation", "superclass_coherence", "paraphrase_leakage", "quality", "unsafe"):
        assert again[key] == first[key], key
    assert (tmp_path / "e2" / "samples").is_dir()  # the report's pictures are still written

    # Other weights: measured again (and the base, unchanged, still read back).
    with torch.no_grad():
        next(iter(cross_attention_params(tiny_pipe.unet).values())).add_(0.5)
    toy_evaluate(tiny_pipe, out=tmp_path / "e3", **kw)
    assert len(calls) == 2 and calls[-1] == model_hash(tiny_pipe)

    # Another classifier (other weights) or other settings: measured again.
    other = StandInClassifier()
    other.w = other.w.flip(0)
    evaluate("tiny", pipe=tiny_pipe, benchmark=toy_benchmark(), classifier=other, settings=toy_settings(), **kw)
    assert len(calls) == 3
    toy_evaluate(tiny_pipe, settings=toy_settings(n=5), **kw)
    assert len(calls) == 4
    # A scorer, classifier or reference without an identity to key on: measured every time.
    toy_evaluate(tiny_pipe, cache=tmp_path / "cache")
    toy_evaluate(tiny_pipe, cache=tmp_path / "cache")
    assert len(calls) == 8  # two states, twice
    # Without a picture cache nothing is cached at all.
    toy_evaluate(tiny_pipe, scorer=FingerprintedScorer(), cache=False)
    assert len(calls) == 10


def sculpt_parser():
    import argparse

    from sculpt.eval.commands import add_commands

    parser = argparse.ArgumentParser(prog="sculpt")
    add_commands(parser.add_subparsers(dest="command"))
    return parser


def test_eval_command_on_the_emoji_benchmark(tiny_pipe, tmp_path, capsys, monkeypatch):
    """`sculpt eval --model emoji --run RUN --report` end to end, the emoji world's classifier, scorer
    and weapon detector reading pictures of the tiny pipeline (which stands in for the emoji model)."""
    from sculpt.emoji.classifier import WEIGHTS_PATH

    if not WEIGHTS_PATH.exists():
        pytest.skip(f"the emoji classifier is not trained yet ({WEIGHTS_PATH})")
    import sculpt.models.loading

    monkeypatch.setattr(sculpt.models.loading, "load_pipeline", lambda model, device="cpu": tiny_pipe)
    run = make_run(tmp_path / "run", tiny_pipe, concepts=(("poodle",), ("church",)))
    args = sculpt_parser().parse_args(
        ["eval", "--model", "emoji", "--run", str(run), "--n", "2", "--n-paraphrase", "1", "--n-unsafe", "1",
         "--steps", "1", "--cache", str(tmp_path / "cache"), "--report", "--device", "cpu"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "Total Acc" in printed and "poodle" in printed and "revived:" in printed
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["measured"] == ["poodle", "church"] and len(m["preservation"]["per_class"]) == 60
    assert m["unsafe"]["model"]["images"] == 16 and m["unsafe"]["detector"]["classes"][0] == "dagger"
    assert m["revival"]["erased_at"] == [1, 2]
    assert (run / "eval" / "report.html").is_file()


def test_eval_command_validates_and_writes_a_report(tiny_pipe, tmp_path, capsys):
    parser = sculpt_parser()
    args = parser.parse_args(["eval", "--run", str(tmp_path), "--patch", "p.safetensors"])
    assert args.func(args) == 2 and "either --run or --patch" in capsys.readouterr().err
    args = parser.parse_args(["eval", "--n", "0"])
    assert args.func(args) == 2 and "--n must be positive" in capsys.readouterr().err
    args = parser.parse_args(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")])
    assert args.func(args) == 2 and "no such folder" in capsys.readouterr().err


def test_a_transformers_imagenet_classifier_gives_imagenette_numbers(tiny_pipe, tmp_path):
    """The real-model path with a random tiny ResNet saved locally (no download): ImageNet label names
    map to the ten Imagenette classes and the whole evaluation runs through the same interface."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    from sculpt.eval.benchmark import IMAGENETTE, imagenette_benchmark
    from sculpt.eval.classifiers import TransformersClassifier

    labels = ["background"] + list(IMAGENETTE.values())
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=len(labels),
                          id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    ResNetForImageClassification(config).save_pretrained(tmp_path / "resnet")
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(tmp_path / "resnet")
    clf = TransformersClassifier(str(tmp_path / "resnet"))
    assert clf.features(noise_pictures("x", 2, 0)).shape == (2, 16)
    m = evaluate("tiny", pipe=tiny_pipe, benchmark=imagenette_benchmark(), classifier=clf, cache=False,
                 settings=toy_settings(n=2, paraphrases=False, quality=False, unsafe=False))
    assert list(m["forgetting"]["per_concept"]) == list(IMAGENETTE)
    assert m["preservation"]["per_class"] == {} and m["preservation"]["drop"] is None


def test_folder_reference_reads_real_pictures_per_class(tmp_path):
    from sculpt.eval.benchmark import folder_reference

    (tmp_path / "tench").mkdir()
    for i, im in enumerate(noise_pictures("tench", 3, 0)):
        im.save(tmp_path / "tench" / f"{i}.png")
    (tmp_path / "tench" / "notes.txt").write_text("not a picture")
    reference = folder_reference(tmp_path)
    assert len(reference("tench", 2, 0)) == 2 and len(reference("tench", 10, 0)) == 3
    assert reference("golf ball", 5, 0) == []
    with pytest.raises(FileNotFoundError, match="no such reference folder"):
        folder_reference(tmp_path / "missing")


# -- families and concepts the benchmark does not know ----------------------------------------------


def _patch_erasing(pipe, path, specs):
    """A patch (cross-attention nudged) whose metadata says it erased these concept specs."""
    params = cross_attention_params(pipe.unet)
    base = {n: p.detach().clone() for n, p in params.items()}
    base_hash = model_hash(pipe)
    with torch.no_grad():
        for n, p in params.items():
            if n.endswith("to_k.weight"):
                p.add_(0.1)
    patch = make_patch(pipe.unet, base, {"base_hash": base_hash, "result_hash": model_hash(pipe),
                                         "concepts": [s["name"] for s in specs],
                                         "erased": [{"concept": s, "data": {}, "seed": 0} for s in specs]})
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(base[n])
    return save_patch(patch, path)


def test_a_family_is_measured_member_by_member_and_none_of_them_counts_as_kept(tiny_pipe, tmp_path):
    family = {"name": "pet", "superclass": "plant", "members": ["cat", "dog", "hamster"]}
    path = _patch_erasing(tiny_pipe, tmp_path / "pet.safetensors", [family])
    m = toy_evaluate(tiny_pipe, patches=[path], cache=tmp_path / "cache")
    assert m["measured"] == ["cat", "dog"] and set(m["forgetting"]["per_concept"]) == {"cat", "dog"}
    assert set(m["preservation"]["per_class"]) == {"car", "tree"}  # members are erased on purpose, not kept
    assert m["resolution"]["pet"]["measured"] == ["cat", "dog"]
    assert m["resolution"]["pet"]["not_measured"] == ["hamster"]  # said, not silently dropped
    # A family written as synonyms that name classes is measured through them.
    path2 = _patch_erasing(tiny_pipe, tmp_path / "pet2.safetensors",
                           [{"name": "pet", "superclass": "animal", "synonyms": ["cat", "kitten"]}])
    m2 = toy_evaluate(tiny_pipe, patches=[path2], cache=tmp_path / "cache")
    assert m2["measured"] == ["cat"] and "cat" not in m2["preservation"]["per_class"]
    # Same weights; coherence is measured against each spec's superclass (plant: tree; animal: cat,
    # dog), not the taxonomy's: two disjoint shares of the same pictures.
    plant, animal = (x["superclass_coherence"]["cat"]["model"] for x in (m, m2))
    assert plant != animal and plant + animal <= 1 + 1e-6


def test_a_concept_the_benchmark_cannot_measure_is_named_and_no_other_list_is_measured(tiny_pipe, tmp_path, caplog):
    path = _patch_erasing(tiny_pipe, tmp_path / "unicorn.safetensors", [{"name": "unicorn", "superclass": "animal"}])
    with caplog.at_level("WARNING", logger="sculpt"):
        m = toy_evaluate(tiny_pipe, patches=[path], cache=tmp_path / "cache")
    assert m["measured"] == [] and m["forgetting"]["per_concept"] == {}  # not the benchmark's targets (cat)
    assert m["forgetting"]["total_acc"] is None
    assert "cat" in m["preservation"]["per_class"]  # nothing was erased that the benchmark knows
    assert m["resolution"]["unicorn"] == {"measured": [], "not_measured": ["unicorn"],
                                          "how": "no class of the benchmark", "superclass": "animal"}
    assert any("unicorn" in r.getMessage() and "not measured" in r.getMessage() for r in caplog.records)


def test_the_unsafe_table_counts_what_the_detector_says_picture_by_picture(tiny_pipe, tmp_path):
    """Per class, the table's count is the number of pictures whose detector score reaches the threshold
    (a picture once per class), 'any' those with at least one class; the bench row carries the same."""
    from sculpt.bench import metrics_row

    detector = ClassifierDetector(StandInClassifier(), ["car", "dog", "tree"], threshold=0.3)
    settings = toy_settings(n_unsafe=8)
    m = toy_evaluate(tiny_pipe, settings=settings, detector=detector, cache=tmp_path / "cache")
    jobs = [Job("something fast", s) for s in settings.seeds(8)]
    pictures = generate(tiny_pipe, jobs, FAST, model_hash(tiny_pipe), ImageCache(tmp_path / "cache"), 16)
    scores = detector.detect(pictures)
    expected = {c: sum(s[c] >= 0.3 for s in scores) for c in ("car", "dog", "tree")}
    expected["any"] = sum(any(s[c] >= 0.3 for c in ("car", "dog", "tree")) for s in scores)
    counts = m["unsafe"]["model"]
    assert {k: counts[k] for k in expected} == expected and counts["images"] == 8
    assert any(0 < expected[c] < 8 for c in ("car", "dog", "tree"))  # a sample where the threshold decides
    row = metrics_row("x", m)
    assert {c: row[f"unsafe:{c}"] for c in ("car", "dog", "tree")} == {c: expected[c] for c in ("car", "dog", "tree")}
    assert row["unsafe_total"] == expected["any"]
