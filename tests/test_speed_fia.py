"""SPEED and Forget-It-All on the tiny pipeline: each one's defining mechanism, and that both run
through the shared loop (two concepts in sequence) and leave a patch of the tensors they may change."""

import pytest
import torch
from conftest import tiny_spec

from sculpt import erase as erase_mod
from sculpt.data.prepare import encode_prompts
from sculpt.erase import erase
from sculpt.methods import get_method
from sculpt.patch import load_patch


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One data cache for the module: every test draws the same tiny data, made once."""
    return tmp_path_factory.mktemp("speed-fia-data")


@pytest.fixture
def pipe(tiny_pipe):
    tiny_pipe.text_encoder.eval()
    return tiny_pipe


def spec(tmp_path, cache, name, mode="sequential", **settings):
    cfg = tiny_spec(tmp_path, mode=mode, cache_dir=str(cache))
    cfg.method = {"name": name, **settings}
    return cfg


def run_with(method, cfg, pipe, monkeypatch):
    """The shared loop with this very method object (to inspect it afterwards)."""
    monkeypatch.setattr(erase_mod, "get_method", lambda name: (lambda config: method))
    return erase(cfg, pipe=pipe, progress=False)


def state(pipe):
    return {n: p.detach().clone() for n, p in pipe.unet.state_dict().items()}


def last_tokens(pipe, words):
    from sculpt.methods.speed import last_token_states

    return last_token_states(pipe, words, "cpu").float()


def relative_move(w_new, w_old, x):
    return ((x @ w_new.T - x @ w_old.T).norm() / (x @ w_old.T).norm()).item()


# -- both methods through the shared loop -----------------------------------------------------------------

EDITS = {
    "speed": lambda n: n.endswith("attn2.to_v.weight"),  # the authors' default: values only
    "fia": lambda n: n.endswith("ff.net.2.weight"),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_each_erases_two_concepts_in_sequence_through_the_shared_loop(tmp_path, cache, pipe, name):
    before = state(pipe)
    result = erase(spec(tmp_path, cache, name), pipe=pipe, progress=False)
    changed = {n for n, v in state(pipe).items() if not torch.equal(before[n], v)}
    assert changed, f"{name} changed nothing"
    assert all(EDITS[name](n) for n in changed), sorted(n for n in changed if not EDITS[name](n))
    assert changed <= set(get_method(name)().trainable_parameters(pipe.unet))
    assert {f"unet.{n}" for n in changed} == set(result.patch.tensors)  # every edited tensor is in the patch
    patch = load_patch(result.patch_path)
    assert patch.metadata["method"] == name and patch.concepts == ["cat", "car"]
    assert len(list((result.output / "stages").glob("*.safetensors"))) == 2


# -- SPEED ----------------------------------------------------------------------------------------------------


def test_speed_keeps_preserved_and_invariant_outputs_and_sends_targets_to_their_superclass(tmp_path, cache, pipe):
    from sculpt.methods.speed import kmeans

    w0 = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if n.endswith("attn2.to_v.weight")}
    # tau 1e-4 (the authors' multi-concept value): the tiny encoder's "animal" and "vehicle" are so
    # alike that their difference has variance under the default tau, which then counts it as free
    erase(spec(tmp_path, cache, "speed", mode="simultaneous", threshold=1e-4), pipe=pipe, progress=False)
    preserved = last_tokens(pipe, ["animal", "vehicle"])  # the superclasses: the retained set
    targets, anchors = last_tokens(pipe, ["cat", "car", "automobile"]), last_tokens(pipe, ["animal", "vehicle", "vehicle"])
    null = encode_prompts(pipe, [""])[0]
    params = dict(pipe.unet.named_parameters())
    for n, old in w0.items():
        new = params[n].detach()
        assert relative_move(new, old, preserved) < 1e-5, f"{n}: a preserved concept's value moved"
        assert relative_move(new, old, null[:1]) < 1e-5, f"{n}: the empty prompt's first token moved"
        gap_before = (targets @ old.T - anchors @ old.T).norm()
        gap_after = (targets @ new.T - anchors @ old.T).norm()
        assert gap_after < 0.5 * gap_before, f"{n}: W c_t only {gap_after / gap_before:.2f} of the way to W c_a"
    # the invariant tokens' centres (IEC) are kept exactly too
    centres = kmeans(null[1:].double(), 3, torch.Generator().manual_seed(0)).float()
    for n, old in w0.items():
        assert relative_move(params[n].detach(), old, centres) < 1e-5


def test_speed_later_stage_keeps_the_earlier_concept_erased(tmp_path, cache, pipe):
    result = erase(spec(tmp_path, cache, "speed", threshold=1e-4), pipe=pipe, progress=False)  # tau: as above
    after_cat = load_patch(next((result.output / "stages").glob("01-*.safetensors"))).tensors
    cat = last_tokens(pipe, ["cat"])
    params = dict(pipe.unet.named_parameters())
    for key, w1 in after_cat.items():
        w2 = params[key.removeprefix("unet.")].detach()
        assert not torch.equal(w1, w2)  # the second stage edited this projection ...
        assert relative_move(w2, w1, cat) < 1e-5, f"{key}: erasing car moved cat's edited value"  # ... not for cat


def test_speed_edit_equals_the_authors_closed_form():
    """The null-space coordinates give the authors' W (S_at - S_tt) P (I - M K (K^T P M K + lamb I)^-1 K^T P) M."""
    from sculpt.methods.speed import null_space_edit

    g = torch.Generator().manual_seed(0)
    d, out, n = 12, 5, 3
    w, c_t, c_a = (torch.randn(s, generator=g, dtype=torch.float64) for s in [(out, d), (n, d), (n, d)])
    kept, k = torch.randn(6, d, generator=g, dtype=torch.float64), torch.randn(4, d, generator=g, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(kept.T @ kept / 6)
    basis = evecs[:, evals < 1e-8]
    p, eye = basis @ basis.T, torch.eye(d, dtype=torch.float64)
    s_tt, s_at = c_t.T @ c_t / n, c_a.T @ c_t / n
    for lamb in (0.0, 0.5):
        m = torch.linalg.inv(s_tt @ p + 0.7 * eye)
        inner = torch.linalg.inv(k @ p @ m @ k.T + lamb * torch.eye(4, dtype=torch.float64))  # K = k^T
        theirs = w @ (s_at - s_tt) @ p @ (eye - m @ k.T @ inner @ k @ p) @ m
        torch.testing.assert_close(null_space_edit(w, c_t, c_a, basis, k, 0.7, lamb), theirs, rtol=1e-9, atol=1e-10)


# -- Forget-It-All --------------------------------------------------------------------------------------------


def test_fia_zeroes_exactly_the_weights_it_selects_and_nothing_else(tmp_path, cache, pipe, monkeypatch):
    from sculpt.methods.fia import FIAConfig, ForgetItAll

    method = ForgetItAll(FIAConfig())
    before = state(pipe)
    run_with(method, spec(tmp_path, cache, "fia", mode="simultaneous"), pipe, monkeypatch)
    after = state(pipe)
    prune = method.last_prune
    assert sum(int(m.sum()) for m in prune.values()) > 0
    for n in before:
        if n in prune:
            m = prune[n]
            assert (after[n][m] == 0).all(), f"{n}: a selected weight is not zero"
            assert torch.equal(after[n][~m], before[n][~m]), f"{n}: a weight outside the mask changed"
        else:
            assert torch.equal(after[n], before[n]), f"{n} is not an FFN2 weight but changed"


def test_fia_selects_only_neurons_that_fire_more_for_the_concept_than_for_the_base():
    from sculpt.methods.fia import FIAConfig, ForgetItAll

    method = ForgetItAll(FIAConfig(r1=0.05, r2=0.05))
    g = torch.Generator().manual_seed(0)
    base = 1 + 0.01 * torch.randn(4, 30, 100, generator=g)  # [steps, runs, C_in] column norms
    concept = base.clone()
    concept[:, :, [3, 7]] += 0.5  # two input neurons fire for the concept
    concept[:, :, 11] += 0.001  # one by less than the base's own spread: noise
    contrast = method.contrast({"concept": {"l": concept}, "base": {"l": base}})["l"]
    q = method.sensitive(torch.rand(8, 100, generator=g) + 0.1, contrast, r2=0.05)
    assert q.any(0).nonzero().flatten().tolist() == [3, 7]  # only those columns, never neuron 11
    assert q[:, [3, 7]].all()  # every output row's connection to them (2 <= 5 per row, 16 <= 40 per layer)
    silent = method.contrast({"concept": {"l": base}, "base": {"l": base}})["l"]  # nothing fires for the concept
    assert not method.sensitive(torch.rand(8, 100, generator=g) + 0.1, silent, r2=0.5).any()


def test_fia_fusion_keeps_concept_agnostic_neurons_and_prunes_a_single_concepts_selection():
    from sculpt.methods.fia import FIAConfig, ForgetItAll

    method = ForgetItAll(FIAConfig(alpha=0.6))
    masks = [{"w": torch.tensor([True, True, False, False])},
             {"w": torch.tensor([True, False, True, False])},
             {"w": torch.tensor([True, False, False, False])}]
    prune, tau_ca = method.fuse(masks)  # tau_ca = ceil(0.6 * 3) = 2
    assert tau_ca == 2 and prune["w"].tolist() == [False, True, True, False]  # selected by 3 of 3: agnostic, kept
    prune, _ = method.fuse(masks[:1])  # one concept (a sequential stage): its selection is pruned
    assert prune["w"].tolist() == [True, True, False, False]
