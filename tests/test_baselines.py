"""The peer methods (baselines) on the tiny pipeline: each one's defining mechanism, and that every
one runs through the shared loop and leaves a patch of the tensors it may change."""

import pytest
import torch

from conftest import tiny_spec
from sculpt import erase as erase_mod
from sculpt.data.prepare import encode_prompts
from sculpt.erase import erase
from sculpt.methods import get_method
from sculpt.models.cross_attention import AttentionRecorder, key_value_params, word_token_mask
from sculpt.patch import load_patch

# Tiny settings: a few steps at a large learning rate, so each mechanism shows in seconds.
FAST = {
    "uce": {},
    "esd-x": {"iterations": 3, "ddim_steps": 4, "lr": 1e-3},
    "esd-u": {"iterations": 3, "ddim_steps": 4, "lr": 1e-3},
    "ac": {"steps": 3, "batch_size": 2, "lr": 1e-3},
    "salun": {"epochs": 1, "batch_size": 2, "lr": 1e-3},
    "fmn": {"steps": 3, "lr": 1e-3},
    "mace": {"lora_steps": 3, "lora_lr": 1e-2, "lam": 1.0},
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One data cache for the module: every test draws the same tiny data, made once."""
    return tmp_path_factory.mktemp("baseline-data")


@pytest.fixture
def pipe(tiny_pipe):
    # The tiny BERT is built in training mode; dropout would make every prompt encoding random.
    tiny_pipe.text_encoder.eval()
    return tiny_pipe


def spec(tmp_path, cache, name, mode="sequential", **overrides):
    cfg = tiny_spec(tmp_path, mode=mode, cache_dir=str(cache))
    cfg.method = {"name": name, **FAST[name], **overrides}  # tiny_spec's defaults are the paper method's
    return cfg


def run_with(method_instance, cfg, pipe, monkeypatch):
    """The shared loop with this very method object (to inspect it afterwards)."""
    monkeypatch.setattr(erase_mod, "get_method", lambda name: (lambda config: method_instance))
    return erase(cfg, pipe=pipe, progress=False)


def state(pipe):
    return {n: p.detach().clone() for n, p in pipe.unet.state_dict().items()}


def attention_mass(pipe, prompt, word):
    """Mean cross-attention probability on the word's tokens (and end-of-text) for fixed noisy inputs."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([100, 400, 700, 900])
    emb = encode_prompts(pipe, [prompt]).expand(4, -1, -1)
    mask = word_token_mask(pipe.tokenizer, [prompt] * 4, [word], end_token=True)
    with torch.no_grad(), AttentionRecorder(pipe.unet, mask) as rec:
        pipe.unet(x_t, t, encoder_hidden_states=emb)
        return rec.mass().mean().item()


EDITS = {  # which tensors each method may change
    "uce": lambda n: n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")),
    "ac": lambda n: n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")),
    "mace": lambda n: n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")),
    "esd-x": lambda n: ".attn2." in n,
    "esd-u": lambda n: ".attn2." not in n,
    "salun": lambda n: True,
    "fmn": lambda n: True,
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_each_baseline_erases_through_the_shared_loop(tmp_path, cache, pipe, name):
    before = state(pipe)
    result = erase(spec(tmp_path, cache, name), pipe=pipe, progress=False)
    changed = {n for n, v in state(pipe).items() if not torch.equal(before[n], v)}
    assert changed, f"{name} changed nothing"
    assert all(EDITS[name](n) for n in changed), sorted(n for n in changed if not EDITS[name](n))
    assert {f"unet.{n}" for n in changed} == set(result.patch.tensors)
    patch = load_patch(result.patch_path)
    assert patch.metadata["method"] == name and patch.concepts == ["cat", "car"]
    assert len(list((result.output / "stages").glob("*.safetensors"))) == 2


def test_esd_x_and_esd_u_share_one_implementation_with_different_parts():
    esd_x, esd_u = get_method("esd-x"), get_method("esd-u")
    assert issubclass(esd_u, esd_x)
    assert esd_x.config_class().train == "cross_attention"
    assert esd_u.config_class().train == "non_cross_attention"
    assert (esd_x.config_class().iterations, esd_x.config_class().lr, esd_x.config_class().eta) == (1000, 1e-5, 1.0)


def test_uce_maps_erased_tokens_to_the_guide_and_keeps_preserved_ones(tmp_path, cache, pipe):
    from sculpt.methods.uce import tail_aligned_tokens

    w0 = {n: p.detach().clone() for n, p in key_value_params(pipe.unet).items()}
    erase(spec(tmp_path, cache, "uce", mode="simultaneous"), pipe=pipe, progress=False)
    c_e, c_g = tail_aligned_tokens(pipe, ["a photo of a cat", "a photo of a car", "a photo of a automobile"],
                                   ["a photo of a animal", "a photo of a vehicle", "a photo of a vehicle"], "cpu")
    c_p, _ = tail_aligned_tokens(pipe, ["a photo of a animal", "a photo of a vehicle"],
                                 ["a photo of a animal", "a photo of a vehicle"], "cpu")
    for n, w in key_value_params(pipe.unet).items():
        w = w.detach()
        kept = (c_p @ w.T - c_p @ w0[n].T).norm() / (c_p @ w0[n].T).norm()
        assert kept < 0.05, f"{n}: preserved outputs moved by {kept:.3f}"
        moved_before = (c_e @ w0[n].T - c_g @ w0[n].T).norm()
        moved_after = (c_e @ w.T - c_g @ w0[n].T).norm()
        assert moved_after < 0.2 * moved_before, f"{n}: W c_e only {moved_after / moved_before:.2f} of the way"


def test_uce_keeps_the_empty_prompt_that_guidance_reads_at_every_step(tmp_path, cache, pipe):
    """As the authors: '' is always preserved (all its tokens). Over sequential edits its keys and
    values then stay within 5%; with `preserve_empty: false` they drift further."""
    empty = encode_prompts(pipe, [""]).flatten(0, 1)
    w0 = {n: p.detach().clone() for n, p in key_value_params(pipe.unet).items()}
    base = {n: t.clone() for n, t in pipe.unet.state_dict().items()}

    def drift(**overrides):
        pipe.unet.load_state_dict(base)
        erase(spec(tmp_path / str(overrides), cache, "uce", **overrides), pipe=pipe, progress=False)
        return max(float((empty @ w.detach().T - empty @ w0[n].T).norm() / (empty @ w0[n].T).norm())
                   for n, w in key_value_params(pipe.unet).items())

    kept, dropped = drift(), drift(preserve_empty=False)
    assert kept <= 0.05, f"the empty prompt's projections moved {kept:.3f}"
    assert dropped > 2 * kept, (kept, dropped)


def test_salun_mask_has_the_stated_density_and_nothing_outside_it_moves(tmp_path, cache, pipe, monkeypatch):
    from sculpt.methods.salun import SalUn, SalUnConfig

    method = SalUn(SalUnConfig(**FAST["salun"], mask_ratio=0.3))
    cfg = spec(tmp_path, cache, "salun", mode="simultaneous", mask_ratio=0.3)
    before = state(pipe)
    run_with(method, cfg, pipe, monkeypatch)
    masked = sum(int(m.sum()) for m in method.mask.values())
    total = sum(m.numel() for m in method.mask.values())
    assert abs(masked / total - 0.3) < 1e-3
    after = state(pipe)
    for n, m in method.mask.items():
        assert torch.equal(before[n][~m], after[n][~m]), f"{n} moved outside the saliency mask"
    assert any(not torch.equal(before[n][m], after[n][m]) for n, m in method.mask.items())


def test_fmn_lowers_attention_on_the_concept_tokens(tmp_path, cache, pipe):
    before = attention_mass(pipe, "a photo of cat", "cat")
    erase(spec(tmp_path, cache, "fmn", steps=10), pipe=pipe, progress=False)
    assert attention_mass(pipe, "a photo of cat", "cat") < 0.9 * before


def test_mace_fused_weights_lower_each_concepts_attention(tmp_path, cache, pipe):
    prompts = {"cat": "a photo of a cat", "car": "a photo of a car"}
    before = {c: attention_mass(pipe, p, c) for c, p in prompts.items()}
    erase(spec(tmp_path, cache, "mace", mode="simultaneous", lora_steps=10, lora_lr=0.1), pipe=pipe, progress=False)
    for c, p in prompts.items():
        assert attention_mass(pipe, p, c) < 0.5 * before[c], c
    # the result is plain weights: no LoRA left in the UNet
    assert not any("parametrizations" in n for n, _ in pipe.unet.named_parameters())


def test_attention_recorder_leaves_the_output_unchanged(pipe):
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    emb = encode_prompts(pipe, ["a photo of a cat", "a photo of a car"])
    mask = word_token_mask(pipe.tokenizer, ["a photo of a cat", "a photo of a car"], ["cat", "car"])
    assert mask.sum(-1).tolist() == [1, 1]
    with_end = word_token_mask(pipe.tokenizer, ["a photo of a cat"], ["cat"], end_token=True)
    assert with_end[0].nonzero().flatten().tolist() == [5, 6]  # [CLS] a photo of a cat [SEP]
    with torch.no_grad():
        plain = pipe.unet(x_t, t, encoder_hidden_states=emb).sample
        with AttentionRecorder(pipe.unet, mask) as rec:
            recorded = pipe.unet(x_t, t, encoder_hidden_states=emb).sample
        again = pipe.unet(x_t, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, plain)  # the original processors are back
    assert len(rec.maps) == 4 and ((rec.mass() > 0) & (rec.mass() < 1)).all()
