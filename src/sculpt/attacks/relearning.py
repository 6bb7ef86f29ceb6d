"""Relearning (benign fine-tuning; "concept resurgence", Suriyakumar et al., arXiv 2410.08074): fine-tune
the erased model for a small budget on pictures of an UNRELATED kept class, then ask for the erased
concept with its plain prompt. A deep erasure stays gone; a shallow one comes back once the weights
move a little -- and a fragile model loses the kept classes it was fine-tuned near.

The standard denoising objective on base-model pictures x_0 of one kept class (prompt y, "a photo of
a cat"), trained only on the UNet's cross-attention projections W (attn2 q, k, v, out):

    W <- Adam_step( W, grad_W  mean || eps - eps_theta(x_t, t; E(y)) ||^2 ),   t ~ U{0..T-1}   (base.denoising_loss)

for `steps` steps at a constant learning rate. The pictures of the concept are then drawn with its
own prompt and the evaluation's sampler and seeds. The fine-tuned tensors come back in
`result.weights`; the pipeline is restored exactly. `sculpt.attacks.run` also re-measures kept
classes with them, and runs the same fine-tune on the base model as the control.

Budget: there is no single published one for this protocol; the defaults are those of the measurement
in issue 13 (20 pictures of "cat", 50 steps, learning rate 3e-4, emoji world), with batch 8. The
concept-resurgence paper fine-tunes all UNet weights on real data sets for longer; here only the
cross-attention moves (the tensors most erasure methods edit), and the pictures come from the base
model.
"""

from __future__ import annotations

import torch
from pydantic import Field

from sculpt.attacks.base import Attack, AttackConfig, AttackError, AttackTarget, NoisyBatch, Sampling, Timer, denoising_loss, \
    encode_pictures, frozen, register
from sculpt.data.prepare import stable_seed
from sculpt.eval.sampling import Job, PromptEmbeddings, generate
from sculpt.models.loading import cross_attention_params, model_hash


class RelearningConfig(AttackConfig):
    steps: int = Field(50, ge=1, description="fine-tuning steps")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate (constant)")
    batch_size: int = Field(8, ge=1, description="pictures per step")
    n_images: int = Field(20, ge=1, description="base-model pictures of the kept class")
    train_prompt: str = Field("a photo of a cat", min_length=1, description="the kept class fine-tuned on")


@register
class Relearning(Attack):
    """Relearning: a short fine-tune of the cross-attention on an unrelated kept class, then the plain prompt."""

    name = "relearning"
    config_class = RelearningConfig
    weights_tuned = True

    def check(self, target: AttackTarget) -> None:
        if self.config.train_prompt in (target.prompt, *target.synonyms):
            raise AttackError(f"attack {self.name!r}: train_prompt {self.config.train_prompt!r} asks for the "
                              f"attacked concept {target.concept!r}; fine-tune on an unrelated kept class")

    def pictures_needed(self, target: AttackTarget) -> dict[str, int]:
        return {self.config.train_prompt: self.config.n_images}

    def generator(self, seed: int, target: AttackTarget) -> torch.Generator:
        """The same draws for every concept and for base and erased model alike: the fine-tune does not
        depend on the concept, so the base model's run is a paired control."""
        return torch.Generator().manual_seed(stable_seed(seed, f"{self.name}:{self.config.train_prompt}"))

    def fine_tune(self, pipe, pictures, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Fine-tune pipe.unet's cross-attention in place on `pictures` of train_prompt; return the
        tuned tensors (clones) and the loss per step. The caller restores the weights."""
        cfg = self.config
        params = cross_attention_params(pipe.unet)
        with frozen(pipe.text_encoder, pipe.unet, pipe.vae):
            latents = encode_pictures(pipe, pictures[: cfg.n_images])
            prompt = PromptEmbeddings(pipe)([cfg.train_prompt]).clone()
            for p in params.values():
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(list(params.values()), lr=cfg.lr)
            losses = []
            for _ in range(cfg.steps):
                loss = denoising_loss(pipe, NoisyBatch.draw(pipe, latents, cfg.batch_size, generator), prompt)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        return {n: p.detach().clone() for n, p in params.items()}, losses

    def run(self, pipe, target: AttackTarget, sampling: Sampling, seed: int):
        saved = {n: p.detach().clone() for n, p in cross_attention_params(pipe.unet).items()}
        timer = Timer()
        try:
            weights, losses = self.fine_tune(pipe, target.pictures[self.config.train_prompt],
                                             self.generator(seed, target))
            seconds = timer()
            timer = Timer()
            jobs = [Job(target.prompt, s) for s in sampling.seeds]
            images = generate(pipe, jobs, sampling.settings, model_hash(pipe), sampling.cache, sampling.batch_size)
            sampling_seconds = timer()
        finally:
            with torch.no_grad():
                for name, p in cross_attention_params(pipe.unet).items():
                    p.copy_(saved[name])
        details = {"train_prompt": self.config.train_prompt, "loss_first": losses[0], "loss_last": losses[-1]}
        return self.result(target, sampling, seed, images=images, steps=self.config.steps, seconds=seconds,
                           sampling_seconds=sampling_seconds, prompt=target.prompt, weights=weights,
                           losses=losses, details=details)
