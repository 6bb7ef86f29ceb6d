"""Is the concept still drawn? The check that ends a stage only when the concept is gone.

A stage of fixed length forgets some concepts and not others (a budget set on one list does not
carry over to another). After the stage's budget, the erasure loop asks a `PresenceCheck` how often
the model, as it is now, still draws the concept; the paper's method goes on training (same mask,
freeze and distillation, `Sculpting.extend`) until the share is at most `CheckConfig.max_share`,
for at most `CheckConfig.max_rounds` rounds, and the run says so when the bound is reached.

The check is never the evaluation: its pictures use seeds from CHECK_SEED on (evaluation draws
seeds 0..N-1), and it never asks the evaluation's classifier. Two checks:

- `JudgedPictures` (a world with a second judge; the emoji world's is its image-text scorer, zero-shot
  over the world's class prompts): draw n pictures of the concept's prompts with the evaluation's
  sampler and count those the judge calls the concept (or one of a family's members)

      present = #{ i : judge(x_i) in concept } / n

- `DiffusionClassifier` (any model, no judge): the model's own denoising error on pictures of the
  concept that the stage never trained on (n pictures drawn at the stage's start, check seeds),
  under the concept's prompt c and under its superclass's s, on fixed noise and timesteps:

      gap_i = (err_s,i - err_c,i) / err_s,i,      err_p,i = mean_t || eps_theta(x_i,t; p) - eps ||^2
      present = #{ i : gap_i > m } / n,           m = median_i gap_i at the stage's start / 2

  Before the erasure the concept's prompt explains its own pictures better than the superclass's
  (gap > 0, most above m by construction); the concept-aware loss makes the two predictions agree,
  so gap -> 0 and the share falls. (A stage resumed from a mid-stage checkpoint draws these pictures
  with the model as resumed, not as the stage got it; the emoji world's check has no such state.)

The emoji world's scorer agrees with its classifier on 96% of the base model's pictures of its 62
class prompts and names the prompted class for 98% of them (the classifier: 96%; 16 pictures each on
the check's seeds, `python benchmarks/check_judge.py`), so it can stand in for the evaluation without
being it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from sculpt.config import CheckConfig, Concept

CHECK_SEED = 7_000_000  # the check's pictures: seeds CHECK_SEED + i, never an evaluation seed


class PresenceCheck(Protocol):
    name: str

    def start(self, pipe, concepts: list[Concept], template: str) -> None:
        """Called once at the start of a stage, before any training (the model as the stage got it)."""

    def __call__(self, pipe, concepts: list[Concept], template: str) -> dict[str, float]:
        """Each concept's present share now (0: gone, 1: every picture shows it)."""


def _check_prompts(concept: Concept, template: str, n: int) -> list[str]:
    prompts = concept.concept_prompts(template)
    return [prompts[i % len(prompts)] for i in range(n)]


@dataclass
class JudgedPictures:
    """Pictures drawn by the model now, judged by a second judge that is not the evaluation's."""

    judge: object  # judge(images, concept) -> list[bool]: does picture i show the concept?
    sampler: object  # sculpt.eval.sampling.SamplerSettings: the evaluation's sampler
    n: int = 32
    name: str = "judged pictures"

    def start(self, pipe, concepts, template) -> None:
        return None

    @torch.no_grad()
    def __call__(self, pipe, concepts, template) -> dict[str, float]:
        from sculpt.eval.sampling import Job, generate
        from sculpt.models.loading import model_hash

        h = model_hash(pipe)
        out = {}
        for c in concepts:
            jobs = [Job(p, CHECK_SEED + i) for i, p in enumerate(_check_prompts(c, template, self.n))]
            shows = self.judge(generate(pipe, jobs, self.sampler, h), c)
            out[c.name] = sum(shows) / len(shows)
        return out


@dataclass
class ScorerJudge:
    """The emoji world's second judge: its image-text scorer, zero-shot over the class prompts (a
    picture shows the class whose prompt it scores highest)."""

    scorer: object  # sculpt.emoji.scorer.EmojiScorer
    classes: list[str]
    template: str = "a photo of a {}"

    def __call__(self, images, concept: Concept) -> list[bool]:
        from sculpt.config import fill_template

        names = {w.casefold() for w in (concept.name, *concept.members)}
        sims = self.scorer.similarity(images, [fill_template(self.template, n) for n in self.classes])
        return [self.classes[i].casefold() in names for i in sims.argmax(-1).tolist()]


@dataclass
class DiffusionClassifier:
    """The model's own denoising error under the concept's vs the superclass's prompt, on pictures of
    the concept drawn at the stage's start (see the module docstring)."""

    sampler: object  # how the pictures are drawn (the evaluation's sampler)
    n: int = 16
    timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
    name: str = "diffusion classifier"
    _state: dict = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def start(self, pipe, concepts, template) -> None:
        from sculpt.data.prepare import encode_pictures
        from sculpt.eval.sampling import Job, generate
        from sculpt.models.loading import model_hash

        h = model_hash(pipe)
        for c in concepts:
            jobs = [Job(p, CHECK_SEED + i) for i, p in enumerate(_check_prompts(c, template, self.n))]
            latents = encode_pictures(pipe, generate(pipe, jobs, self.sampler, h))
            gaps = self.gaps(pipe, latents, c, template)
            self._state[c.name] = (latents, float(gaps.median()) / 2)

    @torch.no_grad()
    def gaps(self, pipe, latents: torch.Tensor, concept: Concept, template: str) -> torch.Tensor:
        """[n] gap_i = (err_s,i - err_c,i) / err_s,i on fixed noise and timesteps."""
        from sculpt.data.prepare import encode_prompts

        err = errors(pipe, latents, encode_prompts(pipe, [concept.concept_prompts(template)[0],
                                                          concept.superclass_prompt(template)]), self.timesteps)
        return (err[1] - err[0]) / err[1].clamp(min=1e-12)

    def __call__(self, pipe, concepts, template) -> dict[str, float]:
        out = {}
        for c in concepts:
            if c.name not in self._state:
                self.start(pipe, [c], template)
            latents, margin = self._state[c.name]
            out[c.name] = float((self.gaps(pipe, latents, c, template) > margin).float().mean())
        return out


@torch.no_grad()
def errors(pipe, latents: torch.Tensor, embeds: torch.Tensor, timesteps: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """[P, n] mean over `timesteps` of || eps_theta(x_t, t; p) - target ||^2 for each prompt embedding p
    and picture latent x, with the same noise for every prompt (the scheduler's prediction type)."""
    from sculpt.models.conditioning import conditioning

    unet, sched = pipe.unet, pipe.scheduler
    cond = conditioning(pipe)
    g = torch.Generator().manual_seed(seed)
    n = len(latents)
    was_training = unet.training
    unet.eval()
    out = torch.zeros(len(embeds), n)
    try:
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=g).to(latents)
            tt = torch.full((n,), t, dtype=torch.long, device=latents.device)
            abar = sched.alphas_cumprod.to(latents.device)[tt].view(-1, 1, 1, 1).to(latents.dtype)
            x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
            target = noise if sched.config.prediction_type != "v_prediction" else \
                abar.sqrt() * noise - (1 - abar).sqrt() * latents
            for p in range(len(embeds)):
                e = embeds[p : p + 1].expand(n, *embeds.shape[1:]).to(latents.device, unet.dtype)
                pred = unet(x_t.to(unet.dtype), tt, **cond.unet_inputs(e, x_t)).sample.float()
                out[p] += (pred - target.float()).pow(2).flatten(1).mean(1).cpu() / len(timesteps)
    finally:
        unet.train(was_training)
    return out


def default_check(model: str, cfg: CheckConfig) -> PresenceCheck:
    """The emoji world: its scorer as the judge of pictures drawn with the evaluation's sampler. Any
    other model: the diffusion-classifier test."""
    from sculpt.eval.sampling import default_sampler

    if model == "emoji":
        from sculpt.emoji.scorer import load_scorer
        from sculpt.emoji.taxonomy import load_taxonomy

        judge = ScorerJudge(load_scorer(), load_taxonomy().names)
        return JudgedPictures(judge, default_sampler(model), n=cfg.pictures, name="emoji scorer (zero-shot)")
    return DiffusionClassifier(default_sampler(model), n=min(cfg.pictures, 16))
