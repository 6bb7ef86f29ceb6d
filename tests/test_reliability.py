"""Reliability: resume after kill -9, one run per folder, Ctrl-C, NaN, bad input, tampering."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from sculpt.erase import RunError, erase, load_checkpoint
from sculpt.io import atomic_write
from sculpt.models.tiny import tiny_pipeline
from sculpt.patch import load_patch
from sculpt.verify import verify_run

CONCEPTS = [{"name": "cat", "superclass": "animal"}, {"name": "car", "superclass": "vehicle"},
            {"name": "tree", "superclass": "plant"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-sd"
    tiny_pipeline().save_pretrained(path)
    return path


def write_spec(folder, model_dir, steps=30, concepts=CONCEPTS, train=None, **method):
    spec = {"model": str(model_dir), "output": "out", "train": train or {},
            "method": {"lr": 1e-3, "epochs": 2, "steps_per_epoch": steps, "warmup_steps": 2,
                       "mask_update_every": 10, **method},
            "data": {"n_images": 2, "num_inference_steps": 2, "batch_size": 2, "cache_dir": "cache"},
            "check": {"enabled": False}, "concepts": concepts}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder / "spec.yaml"


def start(folder, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "sculpt.cli", "erase", "spec.yaml", "--quiet", *extra],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def steps_logged(folder, stage):
    f = folder / "out" / "metrics.jsonl"
    return f.is_file() and any(f'"stage": {stage}' in l for l in f.read_text().splitlines())


def final_tensors(folder):
    return load_patch(folder / "out" / "patch.safetensors").tensors


def test_kill_9_mid_stage_then_resume_reaches_the_same_weights(tmp_path, model_dir):
    ref = tmp_path / "ref"
    write_spec(ref, model_dir)
    p = start(ref)
    assert p.wait(timeout=600) == 0, p.communicate()

    run = tmp_path / "run"
    write_spec(run, model_dir)
    p = start(run)
    wait_for(lambda: steps_logged(run, 1), p)  # stage 1 done, stage 2 under way
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert load_checkpoint(run / "out")[2]["completed_stages"] == 1
    assert not (run / "out" / "patch.safetensors").exists()
    p = start(run)  # the stale lock of the dead process is taken over
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    a, b = final_tensors(ref), final_tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert verify_run(run / "out").ok


def test_kill_9_inside_a_stage_resumes_from_its_last_step_bit_for_bit(tmp_path, model_dir):
    """With a mid-stage checkpoint after every step, a run killed inside its first stage (no stage has
    completed) goes on from the saved step, not from the start, and ends on the same weights."""
    import json

    from sculpt.erase import PROGRESS

    ref = tmp_path / "ref"
    write_spec(ref, model_dir, steps=20, concepts=CONCEPTS[:2])
    p = start(ref)
    assert p.wait(timeout=600) == 0, p.communicate()

    run = tmp_path / "run"
    write_spec(run, model_dir, steps=20, concepts=CONCEPTS[:2], train={"checkpoint_every_s": 0})
    p = start(run)

    def saved_step():
        f = run / "out" / PROGRESS
        try:
            return load_progress_step(f)
        except Exception:  # noqa: BLE001 - not written yet, or being replaced
            return -1

    wait_for(lambda: saved_step() >= 15, p)  # inside stage 1 (40 steps), past a drop/grow
    p.send_signal(signal.SIGKILL)
    p.wait()
    at = saved_step()
    assert load_checkpoint(run / "out") is None  # no stage had completed: only the mid-stage state exists
    p = start(run)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    log = (run / "out" / "erase.log").read_text()
    assert f"inside stage 1 at step {at}" in log
    a, b = final_tensors(ref), final_tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (run / "out" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["stage"] == 0]
    assert steps == list(range(1, 41))  # the steps after the saved one were dropped and done again, once
    assert not (run / "out" / PROGRESS).exists() and verify_run(run / "out").ok


def load_progress_step(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        import json

        return json.loads(f.metadata()["sculpt"])["step"]


def test_second_erase_on_the_same_folder_is_refused(tmp_path, model_dir):
    write_spec(tmp_path, model_dir, steps=200)
    first = start(tmp_path)
    wait_for(lambda: (tmp_path / "out" / ".lock").exists(), first)
    second = start(tmp_path)
    _, err = second.communicate(timeout=120)
    first.kill()
    first.wait()
    assert second.returncode == 1 and "in use by another sculpt erase" in err


def test_ctrl_c_stops_at_a_step_boundary_and_keeps_the_last_stage(tmp_path, model_dir):
    write_spec(tmp_path, model_dir, steps=100)
    p = start(tmp_path)
    wait_for(lambda: steps_logged(tmp_path, 1), p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted" in err and "run the same command again to resume" in err
    assert load_checkpoint(tmp_path / "out")[2]["completed_stages"] == 1


def test_exploding_loss_names_the_term_and_keeps_the_last_good_state(tmp_path):
    from conftest import tiny_spec

    cfg = tiny_spec(tmp_path, method={"lr": 1e38})
    with pytest.raises(RunError, match=r"loss term L_\w+ is (nan|inf)") as exc:
        erase(cfg, pipe=tiny_pipeline(), progress=False)
    assert "stage 1 (cat)" in str(exc.value)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_different_spec_in_an_existing_run_folder_is_refused_and_nothing_changes(tmp_path):
    from conftest import tiny_spec

    cfg = tiny_spec(tmp_path)
    erase(cfg, pipe=tiny_pipeline(), progress=False)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    other = tiny_spec(tmp_path, concepts=[{"name": "dog", "superclass": "animal"}])
    with pytest.raises(RunError, match="different spec"):
        erase(other, pipe=tiny_pipeline(), progress=False)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert before == after


def test_bad_image_size_is_refused_before_anything_is_written(tmp_path):
    from conftest import tiny_spec

    with pytest.raises(ValueError, match="image size 20 is not a positive multiple of 8"):
        erase(tiny_spec(tmp_path, resolution=20), pipe=tiny_pipeline(), progress=False)
    assert not (tmp_path / "run").exists()


def test_full_disk_during_a_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"previous, valid")

    def fill_disk(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, fill_disk)
    assert path.read_bytes() == b"previous, valid"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]


def test_verify_detects_a_tampered_patch(tmp_path, model_dir):
    from conftest import tiny_spec

    cfg = tiny_spec(tmp_path)
    cfg.model = str(model_dir)
    erase(cfg, progress=False)
    run = tmp_path / "run"
    assert verify_run(run).ok
    data = bytearray((run / "patch.safetensors").read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    (run / "patch.safetensors").write_bytes(bytes(data))
    report = verify_run(run)
    assert not report.ok
    assert any("patch.safetensors has changed" in c.detail for c in report.checks)


def test_verify_detects_an_edited_ledger(tmp_path, model_dir):
    from conftest import tiny_spec

    cfg = tiny_spec(tmp_path, concepts=CONCEPTS[:1])
    cfg.model = str(model_dir)
    erase(cfg, progress=False)
    ledger = tmp_path / "run" / "ledger.jsonl"
    ledger.write_text(ledger.read_text().replace('"cat"', '"dog"'))
    assert not verify_run(tmp_path / "run").ok
