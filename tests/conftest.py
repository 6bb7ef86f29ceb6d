import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from threads; one thread per process (subprocesses inherit it) keeps the
# suite fast and its numbers reproducible.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture
def tiny_pipe():
    from sculpt.models.tiny import tiny_pipeline

    return tiny_pipeline(seed=0)


def tiny_spec(tmp_path, concepts=None, method=None, mode="sequential", check=None, **data):
    """A validated RunConfig for the tiny pipeline: few images, few steps; the presence check off unless
    `check` is given (the tiny model draws noise: tests of the check turn it on)."""
    from sculpt.config import RunConfig

    method = method or {}
    if method.get("name", "sculpting") == "sculpting":  # small settings for the paper's method
        method = {"name": "sculpting", "lr": 1e-3, "epochs": 2, "steps_per_epoch": 6, "warmup_steps": 2,
                  "mask_update_every": 4, **method}
    concepts = concepts or [{"name": "cat", "superclass": "animal"},
                            {"name": "car", "superclass": "vehicle", "synonyms": ["automobile"]}]
    return RunConfig(
        model="tiny", output=str(tmp_path / "run"), mode=mode, method=method, concepts=concepts,
        check=check or {"enabled": False},
        data={"n_images": 4, "num_inference_steps": 2, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), **data},
    )
