"""The command line, end to end, on a tiny pipeline saved to disk (as a user's model folder)."""

import os
import subprocess
import sys

import pytest
import yaml

from sculpt.models.tiny import tiny_pipeline


def sculpt(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SCULPT_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "sculpt.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny-sd"
    tiny_pipeline().save_pretrained(path)
    return path


def test_erase_generate_apply(tmp_path, model_dir):
    spec = {"model": str(model_dir), "output": "out",
            "method": {"lr": 1e-3, "epochs": 1, "steps_per_epoch": 4, "warmup_steps": 1},
            "data": {"n_images": 2, "num_inference_steps": 2, "batch_size": 2}, "check": {"enabled": False},
            "concepts": [{"name": "cat", "superclass": "animal"}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    r = sculpt("erase", "spec.yaml", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "forgot cat" in r.stdout and (tmp_path / "out" / "patch.safetensors").is_file()

    r = sculpt("generate", "--model", str(model_dir), "--patch", "out/patch.safetensors",
               "--prompt", "a photo of a cat", "-n", "2", "--steps", "2", "--out", "grid.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "grid.png").stat().st_size > 0

    r = sculpt("apply", "--model", str(model_dir), "out/patch.safetensors", "--save", "patched", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "patched" / "model_index.json").is_file()


def test_bad_spec_names_the_line_and_writes_nothing(tmp_path, model_dir):
    (tmp_path / "spec.yaml").write_text(
        f"model: {model_dir}\noutput: out\nconcepts:\n  - name: fish\n    superclass: fish\n")
    r = sculpt("erase", "spec.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert "spec.yaml:4" in r.stderr and "own superclass" in r.stderr
    assert not (tmp_path / "out").exists()


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "spec.yaml").write_text("model: empty\nconcepts:\n  - {name: cat, superclass: animal}\n")
    r = sculpt("erase", "spec.yaml", "--output", "out", cwd=tmp_path)
    assert r.returncode == 2 and "not a diffusers pipeline folder" in r.stderr
    assert not (tmp_path / "out").exists()


def test_methods_lists_every_method_with_a_description(capsys):
    from sculpt.cli import main
    from sculpt.methods import available_methods

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == available_methods()
    assert all(len(line.split(":", 1)[1].strip()) > 10 for line in lines), lines
