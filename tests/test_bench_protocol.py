"""`sculpt bench --protocol`: the development sweep, the selection rule, the seeded test runs, unit by
unit and resumably, and the test table with intervals. The tiny pipeline and test_eval's stand-in
classifier play the model (as in test_bench); a tiny protocol has 2 settings and one concept a phase."""

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from sculpt import bench_protocol as bp
from sculpt.bench_protocol import ProtocolRunError, World, run_protocol, summarize
from sculpt.protocol import Protocol
from test_eval import FAST, StandInClassifier, StandInScorer, toy_benchmark

TOY_CLASSES = ["cat", "dog", "car", "tree"]  # toy_benchmark's; kept split: dev-kept dog, test-kept tree


def tiny_protocol(**kw) -> Protocol:
    return Protocol(**{"model": "tiny", "dev_concepts": ["car"], "test_concepts": ["cat"], "settings_per_method": 2,
                       "grids": {"uce": {"lam": [0.1, 2.0]}}, "seeds": [0, 1], "n_dev": 2, "n_test": 2, **kw})


def tiny_world(cache: Path) -> World:
    return World("tiny", {"uce": {"lam": 0.5}}, {"n_images": 4, "num_inference_steps": 2, "batch_size": 4,
                                                 "cache_dir": str(cache / "data")},
                 TOY_CLASSES, {"cat": {"name": "cat", "superclass": "animal"},
                               "car": {"name": "car", "superclass": "vehicle"}})


def tiny_factory():
    from sculpt.models.tiny import tiny_pipeline

    return tiny_pipeline(seed=0)


def tiny_context() -> dict:
    """run_unit's keyword arguments for the tiny world (importable by the worker processes)."""
    return {"pipe_factory": tiny_factory, "isolate": False, "benchmark": toy_benchmark(),
            "classifier": StandInClassifier(), "scorer": StandInScorer(), "sampler": FAST, "progress": False,
            "cache": Path(os.environ["SCULPT_TEST_CACHE"]) / "eval", "echo": lambda line: None}


def run(tmp_path, monkeypatch, **kw):
    monkeypatch.setenv("SCULPT_TEST_CACHE", str(tmp_path / "cache"))
    kw.setdefault("echo", lambda line: None)
    return run_protocol(kw.pop("protocol", tiny_protocol()), tmp_path / "out", world=tiny_world(tmp_path / "cache"),
                        **{**tiny_context(), **kw})


def test_a_killed_sweep_resumes_where_it_stopped_and_never_redoes_a_finished_unit(tmp_path, monkeypatch):
    import sculpt.bench
    import sculpt.erase
    import sculpt.eval.evaluate

    evaluation = sys.modules["sculpt.eval.evaluate"]  # sculpt.eval.evaluate is also the function's name
    out = tmp_path / "out"
    real_run_bench, real_erase, real_evaluate = sculpt.bench.run_bench, sculpt.erase.erase, evaluation.evaluate
    benched, erased, evaluated = [], [], []

    def count_run_bench(methods, concepts, model, folder, **kw):
        benched.append(Path(folder).relative_to(out).as_posix())
        return real_run_bench(methods, concepts, model, folder, **kw)

    def count_erase(cfg, **kw):
        erased.append(Path(cfg.output).parent.relative_to(out).as_posix())
        return real_erase(cfg, **kw)

    def killed_at_second_evaluation(*a, **kw):
        evaluated.append(Path(kw["out"]).parents[1].relative_to(out).as_posix())
        if len(evaluated) == 2:
            raise KeyboardInterrupt  # the sweep is killed while the second setting is being evaluated
        return real_evaluate(*a, **kw)

    monkeypatch.setattr(sculpt.bench, "run_bench", count_run_bench)
    monkeypatch.setattr(sculpt.erase, "erase", count_erase)
    monkeypatch.setattr(evaluation, "evaluate", killed_at_second_evaluation)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, monkeypatch, phase="all")
    first, second = out / "dev/uce/s1/seed0", out / "dev/uce/s2/seed0"
    assert (first / "unit.json").is_file()
    assert not (second / "unit.json").is_file() and (second / "uce" / "summary.json").is_file()  # erased, not scored
    assert not (out / "test").exists()  # the test phase needs the whole dev grid
    finished_at = (first / "unit.json").stat().st_mtime_ns

    # --phase report runs nothing and tables what is finished, with the device each unit ran on.
    def no_run(*a, **k):
        raise AssertionError("the report phase ran a unit")

    monkeypatch.setattr(sculpt.bench, "run_bench", no_run)
    partial = run(tmp_path, monkeypatch, phase="report")
    assert [u["setting"] for u in partial["units"]] == ["s1"] and partial["compute"]["by_device"]["cpu"]["units"] == 1
    assert "| on cpu (1 units, process seconds) |" in (out / "protocol.md").read_text()
    monkeypatch.setattr(sculpt.bench, "run_bench", count_run_bench)

    benched.clear(), erased.clear(), evaluated.clear()
    monkeypatch.setattr(evaluation, "evaluate", real_evaluate)
    summary = run(tmp_path, monkeypatch, phase="all")
    # The finished unit is skipped; the interrupted one is taken up again (its finished erase kept,
    # its evaluation redone); then the test phase: paper defaults and the tuned setting, two seeds.
    assert "dev/uce/s1/seed0" not in benched and (first / "unit.json").stat().st_mtime_ns == finished_at
    assert benched[0] == "dev/uce/s2/seed0" and (second / "unit.json").is_file()
    assert json.loads((second / "unit.json").read_text())["resumed"] is True
    assert sorted(erased) == sorted(benched[1:]) == sorted(
        f"test/uce/{s}/seed{seed}" for s in ("default", summary["selected"]["uce"]) for seed in (0, 1))
    assert len(summary["units"]) == 2 + 4
    assert [r["row"] for r in summary["test"]] == ["reference", "paper defaults", "tuned"]
    assert summary["test"][1]["seeds"] == [0, 1] and summary["test"][1]["settings_tried"] == 2
    assert all(lo <= mean <= hi for mean, lo, hi in (summary["test"][2][k] for k in ("total_acc", "kept_acc")))
    # The reference row is the original model as the units' own evaluations saw it.
    metrics = json.loads((out / "test/uce/default/seed0/uce/eval/metrics.json").read_text())
    assert summary["test"][0]["method"] == "original model"
    assert json.loads((out / "test/uce/default/seed0/unit.json").read_text())["result"]["base"]["per_concept"] == \
        metrics["forgetting"]["base_per_concept"]
    md = (out / "protocol.md").read_text()
    assert "## Test table" in md and "## Development" in md and "dev_pareto.png" in md
    assert "| uce | tuned | " + summary["selected"]["uce"] + " | 0, 1 | " in md  # the seeds each row holds
    assert (out / "dev_pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert json.loads((out / "protocol.json").read_text())["selected"] == summary["selected"]
    # Dev scored the dev-kept class only, test the test-kept class only.
    dev_kept = json.loads((first / "unit.json").read_text())["result"]["per_kept"]
    test_kept = json.loads((out / "test/uce/default/seed1/unit.json").read_text())["result"]["per_kept"]
    assert list(dev_kept) == ["dog"] and list(test_kept) == ["tree"]

    # Everything finished: a third call erases and evaluates nothing and gives the same table.
    def refuse(*a, **k):
        raise AssertionError("re-ran a finished unit")

    monkeypatch.setattr(sculpt.bench, "run_bench", refuse)
    assert run(tmp_path, monkeypatch, phase="all")["test"] == summary["test"]


def test_a_folder_holding_another_units_results_is_refused(tmp_path, monkeypatch):
    run(tmp_path, monkeypatch, phase="dev")
    with pytest.raises(ProtocolRunError, match="other settings"):
        run(tmp_path, monkeypatch, phase="dev", protocol=tiny_protocol(n_dev=3))


def _record(phase, method, setting, seed, per_concept, per_kept, fit_s=10.0, coherence=None, base=None):
    unit = {"phase": phase, "method": method, "setting": setting, "seed": seed}
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    return {"unit": unit, "seconds": fit_s + 5, "result": {
        "total_acc": mean(per_concept), "kept_acc": mean(per_kept), "coherence": coherence, "clip": None,
        "fid": None, "per_concept": per_concept, "per_kept": per_kept,
        "per_coherence": {c: coherence for c in per_concept} if coherence is not None else {}, "fit_s": fit_s,
        **({"base": base} if base else {})}}


def test_the_test_table_aggregates_seeds_and_classes_and_differences_against_the_best_baseline():
    p = Protocol(dev_concepts=["d"], test_concepts=["a", "b"], settings_per_method=2, seeds=[0, 1],
                 grids={"sculpting": {"lambda_kd": [1.0, 2.0]}, "uce": {"lam": [0.1, 2.0]}, "fmn": {"lr": [1e-5, 1e-4]}})
    dev = [_record("dev", m, f"s{k}", 0, {"d": 0.0}, {"k": 0.9}, fit_s=f) for m, f in
           (("sculpting", 100.0), ("uce", 1.0), ("fmn", 3.0)) for k in (1, 2)]
    test = []
    for seed in (0, 1):
        # The original model, as every unit of the seed evaluated it (kept x: 1.0, y: 0.9 + seed / 20).
        base = {"per_concept": {"a": 1.0, "b": 0.8}, "per_kept": {"x": 1.0, "y": 0.9 + seed / 20}, "per_coherence": {},
                "clip": 50.0 + seed, "fid": None}
        # sculpting: forgets and keeps best (never "the best baseline": it is the paper's method)
        test.append(_record("test", "sculpting", "s2", seed, {"a": 0.0, "b": 0.1}, {"x": 0.9, "y": 0.8}, base=base))
        test.append(_record("test", "sculpting", "default", seed, {"a": 0.2, "b": 0.2}, {"x": 0.5, "y": 0.5}))
        # uce tuned: Total Acc 0.05 (<= 0.10), kept 0.7 + seed/10; the best baseline by the rule
        test.append(_record("test", "uce", "s1", seed, {"a": 0.1, "b": 0.0}, {"x": 0.7 + seed / 10, "y": 0.7 + seed / 10}))
        test.append(_record("test", "uce", "default", seed, {"a": 0.3, "b": 0.3}, {"x": 0.6, "y": 0.6}))
        # fmn tuned keeps more than uce but forgets too little (0.5 > 0.10): not the best baseline
        test.append(_record("test", "fmn", "default", seed, {"a": 0.5, "b": 0.5}, {"x": 0.95, "y": 0.95}))
    selected = {"sculpting": "s2", "uce": "s1", "fmn": "s2"}  # fmn's choice is its preset: one unit, both rows
    summary = summarize(p, dev + test, selected, same_as_defaults={"fmn"}, rounds=500)

    rows = {(r["method"], r["row"]): r for r in summary["test"]}
    assert list(rows) == [("original model", "reference")] + [
        (m, row) for m in ("sculpting", "uce", "fmn") for row in ("paper defaults", "tuned")]
    original = rows["original model", "reference"]
    assert original["seeds"] == [0, 1] and original["total_acc"] == pytest.approx([0.9, 0.8, 1.0])
    assert original["kept_acc"][0] == pytest.approx((1.0 + 0.9 + 1.0 + 0.95) / 4) and original["clip"] == 50.5
    assert rows["sculpting", "tuned"]["total_acc"][0] == pytest.approx(0.05)
    assert rows["sculpting", "tuned"]["kept_acc"][0] == pytest.approx(0.85)
    assert rows["sculpting", "paper defaults"]["total_acc"] == pytest.approx([0.2, 0.2, 0.2])  # no spread, no width
    mean, lo, hi = rows["uce", "tuned"]["kept_acc"]
    assert mean == pytest.approx(0.75) and lo == pytest.approx(0.7) and hi == pytest.approx(0.8)  # seeds resampled
    assert rows["fmn", "tuned"]["same_as_defaults"] and rows["fmn", "tuned"]["total_acc"][0] == pytest.approx(0.5)
    assert rows["uce", "tuned"]["settings_tried"] == 2 and rows["uce", "tuned"]["tuning_fit_s"] == 2.0
    assert rows["sculpting", "paper defaults"]["tuning_fit_s"] == 200.0 and rows["uce", "tuned"]["fit_s_per_run"] == 10

    assert summary["best_baseline"] == "uce"
    diffs = {(d["method"], d["row"]): d for d in summary["differences"]}
    assert ("uce", "tuned") not in diffs and ("original model", "reference") not in diffs and len(diffs) == 5
    # Paired on (seed, class): sculpting tuned minus uce tuned, kept: 0.85 - (0.7 + seed/10) per pair.
    assert diffs["sculpting", "tuned"]["kept_acc"][0] == pytest.approx(0.10)
    assert diffs["sculpting", "tuned"]["kept_acc"][1:] == pytest.approx([0.0, 0.2], abs=1e-9)
    assert diffs["sculpting", "tuned"]["total_acc"] == pytest.approx([0.0, -0.1, 0.1], abs=1e-9)
    assert diffs["uce", "paper defaults"]["total_acc"] == pytest.approx([0.25, 0.2, 0.3])
    assert summary["compute"]["fit_s"] == {"dev": 208.0, "test": 100.0}
    assert summary["compute"]["total_unit_s"] == 208.0 + 6 * 5 + 100.0 + 10 * 5
    tables = bp.protocol_tables(p, {**summary, "wall_s_this_call": 1.0})
    assert [t[0].split(":")[0].split(" (")[0] for t in tables] == [
        "Test table", "Paired differences against the best baseline", "Development", "Compute"]


def test_the_test_phase_runs_the_setting_the_rule_picks_from_the_dev_results(tmp_path, monkeypatch):
    p = tiny_protocol(settings_per_method=4, seeds=[0], grids={"uce": {"lam": [0.1, 1.0, 2.0, 3.0]}})
    made_up = {  # dev results per setting
        "s1": {"total_acc": 0.50, "kept_acc": 0.99, "coherence": 0.9},  # keeps most, forgets too little
        "s2": {"total_acc": 0.05, "kept_acc": 0.80, "coherence": 0.9},
        "s3": {"total_acc": 0.08, "kept_acc": 0.90, "coherence": 0.7},  # the rule's pick: ties s4 on kept, more coherent
        "s4": {"total_acc": 0.02, "kept_acc": 0.90, "coherence": 0.6},
    }
    ran = []

    def fake_run_unit(unit, out, **kw):
        ran.append(unit)
        scores = made_up[unit.setting] if unit.phase == "dev" else {"total_acc": 0.1, "kept_acc": 0.9, "coherence": 0.8}
        record = _record(unit.phase, unit.method, unit.setting, unit.seed, {"cat": scores["total_acc"]},
                         {"tree": scores["kept_acc"]}, coherence=scores["coherence"])
        record.update(identity=unit.identity(), unit=asdict(unit))
        (out / unit.folder).mkdir(parents=True, exist_ok=True)
        (out / unit.folder / "unit.json").write_text(json.dumps(record))
        return record

    monkeypatch.setattr(bp, "run_unit", fake_run_unit)
    with pytest.raises(ProtocolRunError, match="0 of 4 development settings finished"):
        run(tmp_path, monkeypatch, protocol=p, phase="test")
    summary = run(tmp_path, monkeypatch, protocol=p, phase="all")
    assert summary["selected"] == {"uce": "s3"} and summary["dev"]["uce"]["selected"] == "s3"
    tested = [u for u in ran if u.phase == "test"]
    assert [u.setting for u in tested] == ["default", "s3"]
    assert tested[1].preset == {"name": "uce", "lam": 2.0} and tested[0].preset == {"name": "uce", "lam": 0.5}
    assert [r["setting"] for r in summary["test"]] == ["default", "s3"]
    assert "| uce | s3 | lam=2.0 | 0.080 | 0.900 | 0.700 | 10.0 | cpu | ✔ |" in (tmp_path / "out" / "protocol.md").read_text()


def test_two_workers_run_units_in_their_own_one_thread_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    summary = run(tmp_path, monkeypatch, phase="dev", workers=2, context="test_bench_protocol:tiny_context")
    records = [json.loads((tmp_path / "out" / f"dev/uce/s{k}/seed0/unit.json").read_text()) for k in (1, 2)]
    assert {r["process"]["pid"] for r in records} & {os.getpid()} == set() and len({r["process"]["pid"] for r in records}) == 2
    assert all(r["process"]["threads"] == 1 for r in records)
    assert records[0]["started"] < records[1]["finished"] and records[1]["started"] < records[0]["finished"]  # overlapped
    assert summary["selected"]["uce"] in ("s1", "s2") and len(summary["units"]) == 2


def test_bench_protocol_command_checks_the_file_and_calls_run_protocol(tmp_path, monkeypatch, capsys):
    import argparse

    from sculpt import bench_cli

    seen = {}

    def fake_run_protocol(protocol, out, **kw):
        seen.update(protocol=protocol, out=out, **kw)
        out.mkdir(parents=True, exist_ok=True)
        (out / "protocol.md").write_text("| protocol table |\n")
        return {}

    monkeypatch.setattr(bp, "run_protocol", fake_run_protocol)
    parser = argparse.ArgumentParser(prog="sculpt")
    bench_cli.add_commands(parser.add_subparsers(dest="command"))
    committed = str(Path(__file__).resolve().parents[1] / "benchmarks" / "protocol.yaml")
    call = lambda *a: (lambda args: args.func(args))(parser.parse_args(["bench", "--out", str(tmp_path / "p"), *a]))  # noqa: E731
    assert call("--protocol", committed, "--methods", "uce,mace", "--phase", "dev", "--workers", "2") == 0
    assert seen["methods"] == ["uce", "mace"] and seen["phase"] == "dev" and seen["workers"] == 2
    assert seen["protocol"].settings_per_method == 8 and "| protocol table |" in capsys.readouterr().out
    assert call("--protocol", committed, "--set", "uce.lam=1") == 2
    assert "--set cannot be combined" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(committed).read_text().replace("lam: [0.1", "lamda: [0.1"))
    assert call("--protocol", str(bad)) == 2
    assert "grids.uce.lamda: not a setting of uce" in capsys.readouterr().err


def test_a_selected_setting_that_configures_the_method_like_its_preset_is_run_once_per_seed(tmp_path):
    # The tiny world's UCE preset is {"lam": 0.5}; s1 repeats it and adds guide's default value, s2 differs.
    p = tiny_protocol(grids={"uce": {"lam": [0.5, 2.0], "guide": ["superclass"]}})
    world = tiny_world(tmp_path)
    same = bp.test_units(p, world, {"uce": "s1"})
    assert [(u.setting, u.seed) for u in same] == [("default", 0), ("default", 1)]
    assert bp.tuned_is_default(p, world, {"uce": "s1"}) == {"uce"}
    other = bp.test_units(p, world, {"uce": "s2"})
    assert [(u.setting, u.seed) for u in other] == [("default", 0), ("s2", 0), ("default", 1), ("s2", 1)]
    assert bp.tuned_is_default(p, world, {"uce": "s2"}) == set()
