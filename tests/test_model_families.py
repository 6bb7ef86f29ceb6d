"""Model families beyond SD 1.x: a v-prediction pipeline (SD 2.x 768's objective) erases, patches and
applies like an epsilon one, with the velocity as the denoising target; SDXL (two text encoders, a
pooled embedding, time ids) samples as its pipeline does, erases, patches and applies, with every
method; a single-file checkpoint in the original layout loads, erases and takes its patch."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from conftest import tiny_spec
from sculpt.erase import erase
from sculpt.eval.sampling import PromptEmbeddings, SamplerSettings, denoise, initial_noise
from sculpt.models.loading import model_hash
from sculpt.models.tiny import tiny_pipeline, tiny_sdxl_pipeline
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


# -- SDXL: two text encoders, a pooled embedding and time ids ------------------------------------------

# The paper's method at tiny-model settings: L_a (denoising on the superclass pictures) is off, since
# teaching a random UNet to denoise moves every prompt's output alike and would hide the erasure.
SDXL_METHOD = {"name": "sculpting", "lr": 1e-2, "epochs": 3, "steps_per_epoch": 10, "warmup_steps": 2,
               "mask_update_every": 4, "mask_ratio": 1.0, "lambda_align": 0.0, "lambda_kd": 2.0}


def pipeline_eps(pipe, x0, prompts):
    """The UNet's prediction for each prompt, conditioned as StableDiffusionXLPipeline conditions it
    (its own encode_prompt and time ids), on fixed noisy versions of x0: independent of sculpt's code."""
    size = x0.shape[-1] * pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(50, 950, len(x0)).long()
    x_t = pipe.scheduler.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), torch.float32,
                                      pipe.text_encoder_2.config.projection_dim).expand(len(x0), -1)
    out = {}
    with torch.no_grad():
        for p in prompts:
            tokens, _, pooled, _ = pipe.encode_prompt(p, do_classifier_free_guidance=False)
            added = {"text_embeds": pooled.expand(len(x0), -1), "time_ids": time_ids}
            out[p] = pipe.unet(x_t, t, encoder_hidden_states=tokens.expand(len(x0), -1, -1), added_cond_kwargs=added).sample
    return out


def test_the_sampling_loop_gives_the_sdxl_pipelines_pictures():
    """Pooled embeddings, time ids and SDXL's all-zero unconditional side, as pipe(...) uses them."""
    pipe = tiny_sdxl_pipeline()
    embeds = PromptEmbeddings(pipe)
    prompts = ["a photo of a cat", "a photo of a dog"]
    latents = initial_noise(pipe, [0, 1], 16)
    for guidance in (1.0, 3.0):
        ours = denoise(pipe, latents, embeds(prompts), embeds.negative([""] * 2), guidance,
                       SamplerSettings(steps=3, guidance=guidance))
        theirs = pipe(prompts, latents=latents, num_inference_steps=3, guidance_scale=guidance, height=16, width=16,
                      output_type="pt").images
        assert torch.equal(ours, theirs), guidance  # bit for bit


def test_sdxl_erases_toward_the_superclass_keeps_an_unrelated_prompt_and_patches_apply(tmp_path, monkeypatch):
    """The paper's method on a tiny SDXL loaded from a diffusers folder: "a photo of a cat" is pulled
    toward "a photo of an animal" on the concept's pictures, "a photo of a tree" barely moves; the patch
    applies to the folder's model (`sculpt apply`) and `sculpt generate` draws from it."""
    from safetensors.torch import load_file

    import sculpt.erase

    # A random tiny UNet's look-alike verdicts are arbitrary (it may drop "tree" from the neighbours it
    # keeps): not what this test is about.
    monkeypatch.setattr(sculpt.erase, "drop_lookalikes", lambda *args: {})

    from sculpt.cli import main
    from sculpt.models.loading import load_pipeline

    tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    cfg = tiny_spec(tmp_path, concepts=[{"name": "cat", "superclass": "animal"}], method=SDXL_METHOD)
    cfg.model = str(tmp_path / "sdxl")
    pipe = load_pipeline(cfg.model)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    base = model_hash(pipe)

    result = erase(cfg, pipe=pipe, progress=False)
    data = next(Path(cfg.data.cache_dir).glob("*/data.safetensors"))
    x0 = load_file(str(data))["latents"].repeat(2, 1, 1, 1)  # the concept's own pictures
    cat, animal, tree = "a photo of a cat", "a photo of an animal", "a photo of a tree"
    fresh = load_pipeline(cfg.model)
    before, after = pipeline_eps(fresh, x0, [cat, animal, tree]), pipeline_eps(pipe, x0, [cat, animal, tree])
    gap = lambda e, a, b: (e[a] - e[b]).pow(2).mean().item()
    assert gap(after, cat, animal) < 0.7 * gap(before, cat, animal)  # measured: 0.5
    drift = (after[tree] - before[tree]).pow(2).mean().item()
    assert drift < 0.2 * gap(before, cat, animal)  # measured: 0.11
    assert drift < 0.5 * (after[cat] - before[cat]).pow(2).mean().item()  # measured: 0.3

    patch = load_patch(result.patch_path)
    assert patch.metadata["base_hash"] == base and patch.tensors
    assert main(["apply", "--model", cfg.model, str(result.patch_path), "--save", str(tmp_path / "applied")]) == 0
    assert model_hash(load_pipeline(str(tmp_path / "applied"))) == patch.metadata["result_hash"]
    out = tmp_path / "cat.png"
    assert main(["generate", "--model", cfg.model, "--patch", str(result.patch_path), "--prompt", cat, "-n", "2",
                 "--steps", "2", "--no-cache", "--out", str(out)]) == 0
    assert out.stat().st_size > 0


def test_the_sdxl_model_hash_covers_the_second_text_encoder():
    pipe = tiny_sdxl_pipeline()
    before = model_hash(pipe)
    with torch.no_grad():
        next(pipe.text_encoder_2.parameters()).add_(1e-3)
    assert model_hash(pipe) != before  # a patch made on one SDXL is not applied silently to another


# Every method at tiny settings (as tests/test_baselines.py and tests/test_speed_fia.py run them on SD).
SDXL_EVERY_METHOD = {
    "sculpting": {**SDXL_METHOD, "epochs": 1, "steps_per_epoch": 3},
    "uce": {},
    "speed": {},
    "mace": {"lora_steps": 2, "lora_lr": 1e-2},
    "fmn": {"steps": 2, "lr": 1e-3},
    "esd-x": {"iterations": 2, "ddim_steps": 3, "lr": 1e-3},
    "esd-u": {"iterations": 2, "ddim_steps": 3, "lr": 1e-3},
    "ac": {"steps": 2, "batch_size": 2, "lr": 1e-3},
    "salun": {"epochs": 1, "batch_size": 2, "lr": 1e-3},
    "fia": {},
}


@pytest.fixture(scope="module")
def sdxl_cache(tmp_path_factory):
    """One data cache for the SDXL method runs: the same tiny data, made once."""
    return tmp_path_factory.mktemp("sdxl-data")


def test_every_method_is_listed_for_sdxl():
    from sculpt.methods.base import available_methods

    assert sorted(SDXL_EVERY_METHOD) == available_methods()  # a new method is checked on SDXL too


@pytest.mark.parametrize("name", sorted(SDXL_EVERY_METHOD))
def test_every_method_erases_on_sdxl_and_changes_only_its_tensors(tmp_path, sdxl_cache, name):
    from sculpt.methods import get_method

    pipe = tiny_sdxl_pipeline()
    before = {n: p.detach().clone() for n, p in pipe.unet.state_dict().items()}
    cfg = tiny_spec(tmp_path, concepts=[{"name": "cat", "superclass": "animal"}], cache_dir=str(sdxl_cache))
    cfg.method = {"name": name, **SDXL_EVERY_METHOD[name]}
    result = erase(cfg, pipe=pipe, progress=False)
    changed = {n for n, v in pipe.unet.state_dict().items() if not torch.equal(before[n], v)}
    assert changed, f"{name} changed nothing"
    assert changed <= set(get_method(name)().trainable_parameters(pipe.unet))
    assert {f"unet.{n}" for n in changed} == set(result.patch.tensors)


def test_closed_form_methods_read_the_token_states_cross_attention_reads():
    """UCE, SPEED and MACE edit attn2's keys and values from token states: on SDXL, the two encoders'
    states side by side, exactly the pipeline's encoder_hidden_states (not the pooled row)."""
    from sculpt.data.prepare import encode_token_states

    pipe = tiny_sdxl_pipeline()
    prompts = ["a photo of a cat", ""]
    tokens, _, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert torch.equal(encode_token_states(pipe, prompts), tokens)
    assert tokens.shape[-1] == pipe.unet.config.cross_attention_dim == 16 + 32


# -- single-file checkpoints (the original Stable Diffusion key layout) ---------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def original_unet_key(name: str, layers: int, up_attention: list[bool]) -> str:
    """A diffusers UNet tensor's name in the original layout: input_blocks / middle_block /
    output_blocks, layers + 1 entries per resolution (the resnets, then the down- or upsampler)."""
    head, _, leaf = name.rpartition(".")
    if head in _UNET_FIXED:
        return f"{_UNET_FIXED[head]}.{leaf}"
    part = name.split(".")
    resnet = lambda rest: ".".join([_RESNET.get(rest[0], rest[0]), *rest[1:]])
    if part[0] == "mid_block":
        kind, j, rest = part[1], int(part[2]), part[3:]
        return f"middle_block.{2 * j}.{resnet(rest)}" if kind == "resnets" else f"middle_block.1.{'.'.join(rest)}"
    i, kind, j, rest = int(part[1]), part[2], int(part[3]), part[4:]
    if kind == "downsamplers":
        return f"input_blocks.{(i + 1) * (layers + 1)}.0.op.{'.'.join(rest[1:])}"
    if kind == "upsamplers":
        return f"output_blocks.{i * (layers + 1) + layers}.{2 if up_attention[i] else 1}.conv.{'.'.join(rest[1:])}"
    block = (f"input_blocks.{1 + i * (layers + 1) + j}" if part[0] == "down_blocks"
             else f"output_blocks.{i * (layers + 1) + j}")
    return f"{block}.0.{resnet(rest)}" if kind == "resnets" else f"{block}.1.{'.'.join(rest)}"


def original_vae_key(name: str, blocks: int) -> str:
    """A diffusers VAE tensor's name in the original layout (decoder blocks numbered from the bottom)."""
    import re

    coder, _, rest = name.partition(".")
    if coder in ("quant_conv", "post_quant_conv"):
        return name
    rest = rest.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    rest = re.sub(r"^mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", rest)
    if m := re.match(r"^mid_block\.attentions\.0\.(.*)\.(weight|bias)$", rest):
        rest = f"mid.attn_1.{_VAE_ATTENTION[m[1]]}.{m[2]}"
    rest = re.sub(r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", rest)
    rest = re.sub(r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", rest)
    rest = re.sub(r"^up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{blocks - 1 - int(m[1])}.block.", rest)
    rest = re.sub(r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{blocks - 1 - int(m[1])}.upsample.", rest)
    return f"{coder}.{rest}"


def original_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """An SD 1.x single-file checkpoint of `pipe`: UNet, VAE and CLIP text encoder, original key names."""
    unet, vae = pipe.unet, pipe.vae
    up_attention = ["CrossAttn" in t for t in unet.config.up_block_types]
    out = {"model.diffusion_model." + original_unet_key(n, unet.config.layers_per_block, up_attention): t
           for n, t in unet.state_dict().items()}
    for n, t in vae.state_dict().items():
        key = original_vae_key(n, len(vae.config.block_out_channels))
        out["first_stage_model." + key] = t[:, :, None, None] if ".attn_1." in key and t.dim() == 2 else t  # 1x1 convs
    for n, t in pipe.text_encoder.state_dict().items():
        out["cond_stage_model.transformer." + (n if n.startswith("text_model.") else "text_model." + n)] = t
    return {k: v.contiguous() for k, v in out.items()}


def test_the_original_layout_written_here_is_the_one_diffusers_reads():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    pipe = tiny_pipeline(text_encoder="clip")
    checkpoint = original_checkpoint(pipe)
    for module, convert in ((pipe.unet, convert_ldm_unet_checkpoint), (pipe.vae, convert_ldm_vae_checkpoint)):
        back, want = convert(checkpoint, dict(module.config)), module.state_dict()
        assert set(back) == set(want) and all(torch.equal(back[n], want[n]) for n in want)


def test_a_single_file_checkpoint_loads_erases_and_takes_its_patch(tmp_path):
    """`model: tiny.safetensors` with its configuration folder `tiny/` next to it (config files only:
    every weight comes from the single file), offline; without the folder, a clear error."""
    from safetensors.torch import save_file

    from sculpt.cli import main
    from sculpt.models.loading import ModelLoadError, load_pipeline

    pipe = tiny_pipeline(text_encoder="clip")
    pipe.save_pretrained(tmp_path / "tiny")
    for weights in tmp_path.glob("tiny/*/*.safetensors"):
        weights.unlink()
    checkpoint = tmp_path / "tiny.safetensors"
    save_file(original_checkpoint(pipe), checkpoint)

    loaded = load_pipeline(str(checkpoint))
    assert model_hash(loaded) == model_hash(pipe)
    cfg = tiny_spec(tmp_path, concepts=[{"name": "cat", "superclass": "animal"}])
    cfg.model = str(checkpoint)
    result = erase(cfg, progress=False)  # loads the single file itself
    patch = load_patch(result.patch_path)
    assert patch.tensors and patch.metadata["base_hash"] == model_hash(pipe)
    assert main(["apply", "--model", str(checkpoint), str(result.patch_path), "--save", str(tmp_path / "applied")]) == 0
    assert model_hash(load_pipeline(str(tmp_path / "applied"))) == patch.metadata["result_hash"]

    (tmp_path / "tiny").rename(tmp_path / "elsewhere")
    with pytest.raises(ModelLoadError, match="no configuration folder"):
        load_pipeline(str(checkpoint))


def test_the_attacks_refuse_sdxl_by_name():
    """The attacks build prompt embeddings token by token through one text encoder: on SDXL they would
    condition the UNet on half a prompt, so they refuse it rather than measure something else."""
    from sculpt.attacks.base import AttackError
    from sculpt.attacks.run import attack

    with pytest.raises(AttackError, match="SDXL"):
        attack("tiny-sdxl", pipe=tiny_sdxl_pipeline(), attacks=["relearning"], n=1, cache=False)


def test_evaluation_runs_on_sdxl():
    """`sculpt eval`'s measurements on an SDXL pipeline (the evaluation tests' toy benchmark and
    stand-in classifier): an unchanged model keeps every class."""
    from test_eval import toy_evaluate

    m = toy_evaluate(tiny_sdxl_pipeline(), cache=False)  # every picture drawn twice (base, model)
    assert m["model"]["hash"] == m["model"]["base_hash"] and m["measured"] == ["cat"]
    assert m["preservation"]["drop"] == 0.0 and m["forgetting"]["total_acc"] == m["forgetting"]["base_total_acc"]


def test_an_sdxl_refiner_shaped_pipeline_is_refused_by_name():
    from sculpt.models.loading import ModelLoadError, check_pipeline

    pipe = tiny_sdxl_pipeline()
    check_pipeline(pipe)  # the base shape is accepted
    pipe.register_to_config(requires_aesthetics_score=True)  # the refiner's time ids: an aesthetic score
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        check_pipeline(pipe)
