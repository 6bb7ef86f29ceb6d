"""`sculpt bench`: several methods through the shared loop and evaluation into one table, resumable
method by method. The tiny pipeline stands in for a model, test_eval's random-projection classifier
for the real classifier (fast, deterministic)."""

import csv
import json
import sys

import pytest
import torch

from sculpt import bench as bench_mod
from sculpt.bench import EMOJI_PRESETS, BenchError, quick_preset, run_bench
from sculpt.config import RunConfig
from test_eval import StandInClassifier, StandInScorer, toy_benchmark, toy_settings

CONCEPTS = [{"name": "cat", "superclass": "animal"}, {"name": "car", "superclass": "vehicle"}]
TINY = {"sculpting": {"lr": 1e-3, "epochs": 1, "steps_per_epoch": 3, "warmup_steps": 1, "mask_update_every": 2,
                      "batch_size": 2}}


def tiny_factory():
    from sculpt.models.tiny import tiny_pipeline

    return tiny_pipeline(seed=0)


def bench(tmp_path, methods=("uce", "sculpting"), presets=TINY, **kw):
    kw.setdefault("pipe_factory", tiny_factory)
    kw.setdefault("echo", lambda line: None)
    return run_bench(
        list(methods), CONCEPTS, "tiny", tmp_path / "bench", presets=presets,
        data={"n_images": 4, "num_inference_steps": 2, "batch_size": 4, "cache_dir": str(tmp_path / "data")},
        eval_settings=toy_settings(n=4, n_revival=2, paraphrases=False, unsafe=False),
        benchmark=toy_benchmark(), classifier=StandInClassifier(), scorer=StandInScorer(), detector=False,
        cache=tmp_path / "eval-cache", progress=False, **kw)


def test_bench_writes_one_row_per_method_and_resumes(tmp_path, monkeypatch):
    rows = bench(tmp_path, command="sculpt bench --methods uce sculpting")
    out = tmp_path / "bench"
    assert [r["method"] for r in rows] == ["original model", "uce", "sculpting"]
    columns = ["acc:cat", "acc:car", "total_acc", "preservation_acc", "preservation_drop", "coherence", "clip",
               "fid", "fit_s", "wall_s", "peak_mem_mb", "memory_measure"]
    for r in rows:
        assert all(c in r for c in columns), sorted(set(columns) - set(r))
    for r in rows[1:]:
        assert 0 <= r["acc:cat"] <= 1 and 0 <= r["total_acc"] <= 1 and r["fid"] is not None
        assert r["fit_s"] > 0 and r["wall_s"] >= r["fit_s"] and r["peak_mem_mb"] >= 0
        assert r["memory_measure"] == "RSS rise (in-process)"
    assert rows[0]["fit_s"] is None and rows[0]["preservation_drop"] == 0.0
    # The two methods really differ: UCE edits to_k/to_v in closed form, sculpting trains attn2.
    uce = json.loads((out / "uce" / "summary.json").read_text())
    assert uce["method"] == "uce" and len(uce["stages"]) == 2
    assert json.loads((out / "sculpting" / "bench.json").read_text())["method"]["epochs"] == 1

    with open(out / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["method"] for t in table] == ["original model", "uce", "sculpting"]
    assert set(columns) <= set(table[0])
    md = (out / "bench.md").read_text()
    assert "sculpt bench --methods uce sculpting" in md and md.count("\n| ") == 4  # header + 3 rows
    html = (out / "report.html").read_text()
    assert "<h2>Cost</h2>" in html and ">uce<" in html and ">sculpting<" in html
    assert RunConfig(**__import__("yaml").safe_load((out / "specs" / "uce.yaml").read_text())).method_name == "uce"

    # A second call finds both methods finished: neither erase nor evaluation runs again.
    def refuse(*a, **k):
        raise AssertionError("re-ran a finished method")

    monkeypatch.setattr(sys.modules["sculpt.erase"], "erase", refuse)
    monkeypatch.setattr(sys.modules["sculpt.eval.evaluate"], "evaluate", refuse)
    again = bench(tmp_path)
    assert again == rows

    # An evaluation that is missing (or made with other settings) is redone without re-erasing.
    (out / "uce" / "eval" / "metrics.json").unlink()
    monkeypatch.undo()
    monkeypatch.setattr(sys.modules["sculpt.erase"], "erase", refuse)
    third = bench(tmp_path)
    assert [r["method"] for r in third] == ["original model", "uce", "sculpting"]
    assert third[1]["total_acc"] == rows[1]["total_acc"]  # same pictures (seeds, cache), same numbers


def test_bench_refuses_a_method_folder_holding_other_settings(tmp_path):
    bench(tmp_path, methods=("uce",))
    with pytest.raises(BenchError, match="other settings"):
        bench(tmp_path, methods=("uce",), presets={"uce": {"lam": 2.0}})


def test_isolated_methods_run_in_their_own_process_with_their_peak_rss(tmp_path):
    said = []
    # A large parent (as the bench process is once it has evaluated): the child's peak must be its own.
    ballast = torch.ones(2 * 2**30 // 4)  # 2 GiB, touched
    rows = bench(tmp_path, methods=("uce",), pipe_factory=None, worker_factory="sculpt.models.tiny:tiny_pipeline",
                 isolate=True, echo=said.append)
    # The child's training-data progress reaches the parent's output, one line per concept.
    assert [line.split(":")[2].strip() for line in said if line.startswith("bench: data: ")] == ["cat", "car"]
    r = rows[1]
    assert r["memory_measure"] == "peak RSS of its own process"
    assert 50 < r["peak_mem_mb"] < 1500  # a whole Python + torch process, not a delta, and not the parent's 2 GiB
    del ballast
    assert (tmp_path / "bench" / "uce" / "patch.safetensors").is_file()


def test_emoji_presets_follow_the_stated_scaling_and_are_valid_specs():
    for name, preset in EMOJI_PRESETS.items():
        RunConfig(model="emoji", method=preset, concepts=CONCEPTS)  # validates against the method's config
        assert preset["name"] == name
    from sculpt.emoji.demo import EMOJI_METHOD

    assert bench_mod.LR_SCALE == pytest.approx(EMOJI_METHOD["lr"] / 3e-6)  # the paper's method is the reference
    assert EMOJI_PRESETS["esd-x"]["iterations"] == 400 and EMOJI_PRESETS["esd-x"]["lr"] == 1e-3
    assert EMOJI_PRESETS["fmn"]["steps"] == 14 and EMOJI_PRESETS["ac"]["steps"] == 160
    assert quick_preset(EMOJI_PRESETS["esd-x"])["iterations"] == 40
    assert bench_mod.STEP_SCALE == pytest.approx(0.4)


def test_bench_command_builds_the_emoji_bench(tmp_path, monkeypatch, capsys):
    import argparse

    from sculpt import bench_cli

    seen = {}

    def fake_run_bench(methods, concepts, model, out, **kw):
        seen.update(methods=methods, concepts=concepts, model=model, out=out, **kw)
        (out / "bench.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text("| table |\n")
        return [{"method": "original model"}]

    monkeypatch.setattr(bench_mod, "run_bench", fake_run_bench)
    parser = argparse.ArgumentParser(prog="sculpt")
    bench_cli.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--methods", "sculpting", "esd-x", "uce", "--targets", "all",
                              "--out", str(tmp_path / "b"), "--quick"])
    assert args.func(args) == 0
    assert seen["methods"] == ["sculpting", "esd-x", "uce"] and seen["model"] == "emoji"
    assert len(seen["concepts"]) == 10 and all(c.superclass for c in seen["concepts"])
    assert seen["presets"]["esd-x"]["iterations"] == 40  # --quick: a tenth of the emoji preset
    assert seen["eval_settings"].n == 8 and seen["isolate"] is True
    assert "| table |" in capsys.readouterr().out

    bad = parser.parse_args(["bench", "--methods", "nope", "--out", str(tmp_path / "c")])
    assert bad.func(bad) == 2
    bad = parser.parse_args(["bench", "--targets", "unicorn-ish thing", "--out", str(tmp_path / "c")])
    assert bad.func(bad) == 2


def test_bench_set_overrides_one_methods_preset_and_names_bad_settings(tmp_path, monkeypatch, capsys):
    import argparse

    from sculpt import bench_cli

    seen = {}

    def fake_run_bench(methods, concepts, model, out, **kw):
        seen.update(kw)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text("| table |\n")
        return [{"method": "original model"}]

    monkeypatch.setattr(bench_mod, "run_bench", fake_run_bench)
    parser = argparse.ArgumentParser(prog="sculpt")
    bench_cli.add_commands(parser.add_subparsers(dest="command"))
    run = lambda *a: (lambda args: args.func(args))(parser.parse_args(  # noqa: E731
        ["bench", "--methods", "sculpting", "uce", "--out", str(tmp_path / "b"), *a]))
    before = dict(bench_mod.EMOJI_PRESETS["sculpting"])
    assert run("--set", "sculpting.lambda_kd=0.25") == 0
    assert seen["presets"]["sculpting"]["lambda_kd"] == 0.25
    assert seen["presets"]["sculpting"]["lr"] == bench_mod.EMOJI_PRESETS["sculpting"]["lr"]  # rest kept
    assert bench_mod.EMOJI_PRESETS["sculpting"] == before  # the module's preset is not modified
    capsys.readouterr()
    assert run("--set", "sculpting.lambda_kd=-1") == 2
    assert "lambda_kd" in capsys.readouterr().err
    assert run("--set", "sculpting.no_such_field=1") == 2
    assert "no_such_field" in capsys.readouterr().err
    assert run("--set", "esd-x.lr=1") == 2  # esd-x is not run
    assert "esd-x" in capsys.readouterr().err
    assert run("--set", "lambda_kd=1") == 2
    assert "METHOD.FIELD=VALUE" in capsys.readouterr().err


def test_bench_attacks_every_method_and_adds_a_column_per_attack(tmp_path, monkeypatch):
    rows = bench(tmp_path, methods=("uce",), attacks=["ring-a-bell"])
    found = json.loads((tmp_path / "bench" / "uce" / "attack" / "attack.json").read_text())
    rates = [v["attacks"]["ring-a-bell"]["model"]["rate"] for v in found["concepts"].values()]
    assert set(found["concepts"]) == {"cat", "car"} and found["n"] == 4
    assert rows[1]["attack:ring-a-bell"] == pytest.approx(sum(rates) / len(rates))
    assert rows[0].get("attack:ring-a-bell") is None  # the original model is not attacked
    assert "under ring-a-bell ↓" in (tmp_path / "bench" / "bench.md").read_text()
    # Finished attacks are found, not re-run.
    import sculpt.attacks.run as attack_run

    monkeypatch.setattr(attack_run, "attack", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-ran")))
    assert bench(tmp_path, methods=("uce",), attacks=["ring-a-bell"]) == rows
