"""Patches: base + patch == trained model bit for bit; stacking; refusals with clear messages."""

import pickle

import pytest
import torch

from conftest import tiny_spec
from sculpt.erase import erase
from sculpt.models.loading import model_hash
from sculpt.models.tiny import tiny_pipeline
from sculpt.patch import PatchError, apply_patch, apply_patches, load_patch


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("patch")
    result = erase(tiny_spec(tmp), pipe=tiny_pipeline(), progress=False)
    return result


def test_round_trip_is_bit_exact(run):
    fresh = tiny_pipeline()
    apply_patch(fresh, load_patch(run.patch_path))
    trained = run.pipe.unet.state_dict()
    for n, t in fresh.unet.state_dict().items():
        assert torch.equal(t, trained[n]), n
    assert model_hash(fresh) == load_patch(run.patch_path).metadata["result_hash"]


def test_patch_is_much_smaller_than_the_unet(run):
    unet_bytes = sum(t.numel() * t.element_size() for t in run.pipe.unet.state_dict().values())
    assert run.patch_path.stat().st_size < 0.5 * unet_bytes


def test_metadata_records_provenance(run):
    meta = load_patch(run.patch_path).metadata
    assert meta["concepts"] == ["cat", "car"] and meta["superclasses"] == {"cat": "animal", "car": "vehicle"}
    assert meta["method"] == "sculpting" and meta["method_config"]["mask_ratio"] == 0.5
    assert len(meta["base_hash"]) == 64 and meta["versions"]["torch"] == torch.__version__


def test_stacked_patches_apply_in_order_only(run, tmp_path):
    # a second run that starts from the first one's result
    spec = tiny_spec(tmp_path, concepts=[{"name": "tree", "superclass": "plant"}])
    spec.patches = [str(run.patch_path)]
    second = erase(spec, pipe=tiny_pipeline(), progress=False)
    # The second patch knows everything erased so far (a third run keeps distilling all of it).
    erased = [e["concept"]["name"] for e in load_patch(second.patch_path).metadata["erased"]]
    assert erased == [*run.patch.concepts, "tree"]
    fresh = tiny_pipeline()
    with pytest.raises(PatchError, match="made on another model") as exc:
        apply_patch(fresh, load_patch(second.patch_path))
    assert load_patch(second.patch_path).metadata["base_hash"][:16] in str(exc.value)
    apply_patches(fresh, [run.patch_path, second.patch_path])
    assert model_hash(fresh) == model_hash(second.pipe)


def test_a_stacked_run_refuses_a_concept_its_patches_already_erased(run, tmp_path):
    from sculpt.erase import RunError

    spec = tiny_spec(tmp_path, concepts=[{"name": run.patch.concepts[0], "superclass": "plant"}])
    spec.patches = [str(run.patch_path)]
    with pytest.raises(RunError, match=f"already erased.*{run.patch.concepts[0]}"):
        erase(spec, pipe=tiny_pipeline(), progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_wrong_base_refused_unless_forced(run):
    other = tiny_pipeline(seed=1)
    with pytest.raises(PatchError, match="made on another model"):
        apply_patch(other, load_patch(run.patch_path))
    apply_patch(other, load_patch(run.patch_path), force=True)


def test_pickle_disguised_as_patch_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "patch.safetensors"
    path.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(PatchError, match="pickle"):
        load_patch(path)
    assert not marker.exists()


def test_truncated_patch_gives_clear_error(run, tmp_path):
    data = run.patch_path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchError, match="corrupt or truncated"):
        load_patch(bad)
