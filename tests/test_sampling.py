"""The sampling loop: the pipeline's pictures where it is meant to give them, the faster paths within
their stated tolerance, training data unchanged, and progress output a log file can hold."""

import io

import numpy as np
import pytest
import torch

from sculpt.eval.sampling import Job, PromptEmbeddings, SamplerSettings, denoise, generate, initial_noise
from sculpt.models.loading import model_hash
from sculpt.progress import Progress

PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a car", "a photo of a cat"]


def pipeline_pictures(pipe, latents, cond, uncond, steps, guidance):
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents, num_inference_steps=steps,
               guidance_scale=guidance, output_type="pt")
    return out.images


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_loop_with_the_pipelines_scheduler_gives_the_pipelines_pictures(tiny_pipe, guidance):
    tiny_pipe.set_progress_bar_config(disable=True)
    embeds = PromptEmbeddings(tiny_pipe)
    latents = initial_noise(tiny_pipe, [0, 1, 2, 3], 16)
    cond, uncond = embeds(PROMPTS), embeds([""] * 4)
    ours = denoise(tiny_pipe, latents, cond, uncond, guidance, SamplerSettings(steps=4, guidance=guidance))
    theirs = pipeline_pictures(tiny_pipe, latents, cond, uncond if guidance > 1 else None, 4, guidance)
    assert torch.equal(ours, theirs)  # bit for bit: the loop is the pipeline's


def test_faster_paths_stay_close_and_are_keyed_apart(tiny_pipe):
    embeds = PromptEmbeddings(tiny_pipe)
    latents = initial_noise(tiny_pipe, [0, 1, 2, 3], 16)
    cond, uncond = embeds(PROMPTS), embeds([""] * 4)
    ref = denoise(tiny_pipe, latents, cond, uncond, 3.0, SamplerSettings(steps=25, guidance=3.0))
    bf16 = denoise(tiny_pipe, latents, cond, uncond, 3.0, SamplerSettings(steps=25, guidance=3.0, precision="bf16"))
    dpm = denoise(tiny_pipe, latents, cond, uncond, 3.0, SamplerSettings(steps=10, guidance=3.0, scheduler="dpm++2m"))
    # Documented tolerance: bf16 autocast moves pixels by a few levels at most on average; DPM-Solver++
    # in 10 steps lands near DDIM's 25-step result (same ODE), far nearer than another seed does.
    other_seed = denoise(tiny_pipe, initial_noise(tiny_pipe, [4, 5, 6, 7], 16), cond, uncond, 3.0,
                         SamplerSettings(steps=25, guidance=3.0))
    assert (bf16 - ref).abs().mean() < 0.02
    assert (dpm - ref).abs().mean() < 0.25 * (other_seed - ref).abs().mean()
    assert not torch.equal(bf16, ref) and not torch.equal(dpm, ref)
    keys = {str(s.key_data(tiny_pipe)) for s in (SamplerSettings(), SamplerSettings(precision="bf16"),
                                                 SamplerSettings(scheduler="dpm++2m"), SamplerSettings(steps=10))}
    assert len(keys) == 4  # no cached picture of one path is served for another


def test_a_picture_does_not_depend_on_its_batch_under_every_path(tiny_pipe):
    h = model_hash(tiny_pipe)
    for settings in (SamplerSettings(steps=3, guidance=2.0, scheduler="dpm++2m"),
                     SamplerSettings(steps=3, guidance=2.0, precision="bf16")):
        mixed = generate(tiny_pipe, [Job("a dog", 5), Job("a cat", 1), Job("a car", 2)], settings, h, batch_size=3)
        alone = generate(tiny_pipe, [Job("a cat", 1)], settings, h, batch_size=1)[0]
        diff = np.abs(np.asarray(alone, dtype=int) - np.asarray(mixed[1], dtype=int))
        assert diff.max() <= 2


def test_unknown_sampler_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="euler"):
        SamplerSettings(scheduler="euler")
    with pytest.raises(ValueError, match="fp8"):
        SamplerSettings(precision="fp8")


def test_training_data_pictures_are_the_pipelines(tiny_pipe, tmp_path):
    """generate_latents runs the shared loop; the pictures (and so the cached data) are what
    pipe(...) drew for the same batch generator before."""
    from PIL import Image

    from sculpt.config import DataConfig
    from sculpt.data.prepare import generate_latents

    tiny_pipe.set_progress_bar_config(disable=True)
    cfg = DataConfig(n_images=3, num_inference_steps=3, batch_size=2, guidance_scale=3.0)
    generate_latents(tiny_pipe, ["a photo of a cat", "a photo of a kitty"], "a dog", cfg, 7, tmp_path, "concept")
    size = tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor
    for start, n in ((0, 2), (2, 1)):
        prompts = ["a photo of a cat", "a photo of a kitty"][:n] if start == 0 else ["a photo of a cat"]
        images = tiny_pipe(prompts, negative_prompt=["a dog"] * n, num_inference_steps=3, guidance_scale=3.0,
                           height=size, width=size, generator=torch.Generator().manual_seed(7 + start), output_type="np").images
        for j in range(n):
            saved = np.asarray(Image.open(tmp_path / f"concept_{start + j:04d}.png"))
            assert np.array_equal(saved, (images[j] * 255).round().astype("uint8"))


# -- progress output ---------------------------------------------------------------------------------


def test_progress_to_a_file_is_one_line_per_phase_without_carriage_returns(monkeypatch):
    monkeypatch.delenv("SCULPT_PROGRESS", raising=False)
    stream = io.StringIO()  # not a terminal
    with Progress("eval base model: class prompts", total=500, unit="img", stream=stream) as bar:
        for _ in range(500):
            bar.update(1)
            bar.set_postfix({"loss": 0.5})
    with Progress("nothing to draw", total=0, stream=stream) as bar:
        pass
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval base model: class prompts: 500 img in ")
    assert "loss=0.5" in lines[0]


def test_progress_on_a_terminal_is_a_bar(monkeypatch):
    monkeypatch.delenv("SCULPT_PROGRESS", raising=False)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with Progress("stage 1: cat", total=10, unit="step", stream=stream) as bar:
        for _ in range(10):
            bar.update(1)
    assert "10/10" in stream.getvalue() and "\r" in stream.getvalue()


def test_an_erase_run_logged_to_a_file_stays_small_and_line_based(tiny_pipe, tmp_path, capfd, monkeypatch):
    from conftest import tiny_spec
    from sculpt.erase import erase

    monkeypatch.delenv("SCULPT_PROGRESS", raising=False)
    erase(tiny_spec(tmp_path), pipe=tiny_pipe, progress=True)
    err = capfd.readouterr().err
    assert "\r" not in err
    phases = [line for line in err.splitlines() if line.startswith(("data: ", "stage "))]
    # one line per concept's data, one for their neighbours' (the paper's method keeps 4 each) and one per stage
    assert [p.split(":")[0] + ":" + p.split(":")[1] for p in phases] == [
        "data: cat", "data: car", "data: 8 neighbours", "stage 1: cat", "stage 2: car"]
    assert len(err) < 2000


def test_library_and_command_line_sample_the_same_way_by_default():
    import argparse

    from sculpt.eval.commands import add_sampler_arguments, sampler_from_args
    from sculpt.eval.evaluate import EvalSettings
    from sculpt.eval.sampling import EMOJI_SAMPLER

    parser = argparse.ArgumentParser()
    add_sampler_arguments(parser)
    for model in ("emoji", "CompVis/stable-diffusion-v1-4"):
        assert EvalSettings().for_model(model).sampler == sampler_from_args(parser.parse_args([]), model)
    assert EvalSettings().for_model("emoji").sampler == EMOJI_SAMPLER
    assert EvalSettings().for_model("./my-sd").sampler == SamplerSettings(steps=25, guidance=7.5)
    given = SamplerSettings(steps=3)
    assert EvalSettings(sampler=given).for_model("emoji").sampler is given
    assert sampler_from_args(parser.parse_args(["--steps", "7"]), "emoji").steps == 7
