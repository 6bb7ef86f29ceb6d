"""Model families beyond SD 1.x: a v-prediction pipeline (SD 2.x 768's objective) erases, patches and
applies like an epsilon one, with the velocity as the denoising target."""

import torch
from accelerate import Accelerator

from conftest import tiny_spec
from sculpt.erase import erase
from sculpt.models.loading import model_hash
from sculpt.models.tiny import tiny_pipeline
from sculpt.patch import apply_patch, load_patch
from sculpt.stage import StageContext


def test_the_denoising_target_follows_the_models_prediction_type():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    for kind in ("epsilon", "v_prediction"):
        pipe = tiny_pipeline(prediction_type=kind)
        ctx = StageContext(pipe=pipe, accelerator=Accelerator(cpu=True), index=0, concepts=[], previous=[], seed=0)
        want = noise if kind == "epsilon" else pipe.scheduler.get_velocity(x0, noise, t)
        assert torch.equal(ctx.target(x0, noise, t), want), kind
    assert not torch.allclose(want, noise)  # the two targets differ: the test can tell them apart


def test_a_v_prediction_pipeline_erases_patches_and_applies(tmp_path):
    pipe = tiny_pipeline(prediction_type="v_prediction")
    base = model_hash(pipe)
    result = erase(tiny_spec(tmp_path), pipe=pipe, progress=False)
    patch = load_patch(result.patch_path)
    assert patch.tensors and patch.metadata["base_hash"] == base
    fresh = tiny_pipeline(prediction_type="v_prediction")
    apply_patch(fresh, patch)
    assert model_hash(fresh) == patch.metadata["result_hash"]
