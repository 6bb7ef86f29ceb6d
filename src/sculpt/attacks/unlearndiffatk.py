"""UnlearnDiffAtk (Zhang et al., ECCV 2024; github OPTML-Group/Diffusion-MU-Attack): a few prefix
tokens chosen so that the ERASED model's own denoising loss on pictures of the concept is low -- the
diffusion model as its own classifier, no other model involved -- then the concept's prompt is drawn
with that prefix.

Variables: for each of k prefix positions a distribution p_j over the vocabulary (the probability
simplex Delta^V), started uniform. One step, with c(.) the prompt embedding of
"<k prefix tokens> <the concept's prompt>" (sculpt.attacks.embeddings):

    o_j   ~ Categorical(p_j)                     one-hot sample, straight-through:
                                                 dL/dp_j := clip(dL/do_j, -1, 1)
    v_j   = o_j E                                E: the encoder's input token table [V, d]
    L(p)  = mean || eps - eps_theta'(x_t, t; c(v_1..v_k)) ||^2,   x_0 ~ base-model pictures of the
                                                 concept, t ~ U{0..T-1}, eps ~ N(0, I)  (base.denoising_loss)
    p_j  <- Proj_Delta( Adam_step(p_j, dL/dp_j; lr, weight decay) )   Euclidean projection onto the simplex

After the last step each position takes its most likely token, token_j = argmax p_j: the attack ends
in a real text prompt (`result.prompt`), and the pictures are drawn from its embedding with the
evaluation's sampler and seeds. `space="embeddings"` optimises the k input vectors v_j directly
(continuous, Adam on v; initialised from random vocabulary tokens): a stronger white-box upper bound
than any typed prompt, the "prefix token embeddings" of issue 13.

Published budget (the authors' configs): k = 5 tokens for nudity (3 in their object configs),
Adam lr 0.01, weight decay 0.1, 40 iterations at each of 50 timesteps (t = 10, 30, ..., 990) = at
most 2000 steps, one target picture per attacked prompt. Deviations here, all deliberate:
- t is drawn at random each step (the unbiased estimate of the full denoising loss) instead of 40
  steps at each fixed timestep in ascending order; `steps` counts all of them (default 2000 = 50 x 40);
- no classifier in the loop: the published attack generates and classifies after each timestep and
  stops at the first success (its success rate counts a prompt as broken if any checkpoint's picture
  was); here the full budget always runs and the final prompt is judged on n fresh seeds -- the
  classifier stays the judge, never the attacker's guide;
- one prefix per concept, learned on `n_images` base-model pictures (minibatches of `batch_size`)
  and judged on the evaluation's seeds, instead of one prefix per (prompt, seed, picture);
- special tokens (begin, end, padding, unknown, mask) are left out of the vocabulary;
- the attack ends at the better of its two end points by its own objective: the found prefix, or no
  prefix at all when the prefix does not lower the probe loss below the plain prompt's
  (`keep_better`, on by default; details["ends_with"] says which). The published attack reaches the
  same place another way: a prompt that already shows the concept before the attack counts as broken.
  No classifier is involved in the choice.
Emoji world budget: 200 steps at batch 4 on 16 pictures (about 20 s a concept on one CPU core).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from sculpt.attacks.base import Attack, AttackConfig, AttackTarget, NoisyBatch, Sampling, Timer, denoising_loss, \
    encode_pictures, frozen, register
from sculpt.attacks.embeddings import SlotPrompt, allowed_tokens, draw, encode, token_table


class UnlearnDiffAtkConfig(AttackConfig):
    tokens: int = Field(5, ge=1, description="prefix tokens k (published: 5 for nudity, 3 for objects)")
    steps: int = Field(2000, ge=1, description="optimisation steps (published: at most 50 timesteps x 40)")
    lr: float = Field(0.01, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.1, ge=0, description="Adam weight decay (L2 on the variables)")
    batch_size: int = Field(1, ge=1, description="(picture, t, noise) draws per step")
    n_images: int = Field(1, ge=1, description="base-model pictures of the concept to learn from")
    space: Literal["tokens", "embeddings"] = Field(
        "tokens", description="tokens: distributions over the vocabulary, ends in a real prompt (published); "
                              "embeddings: the prefix input vectors themselves")
    probe: int = Field(32, ge=1, description="fixed draws on which the loss before / after is reported")
    keep_better: bool = Field(True, description="end with the prompt without prefix when the found prefix does "
                                                "not lower the probe loss below it (the best point by the "
                                                "attack's own objective)")


class _StraightThroughSample(torch.autograd.Function):
    """Forward: a one-hot sample o ~ Categorical(p) per row. Backward: the gradient with respect to o,
    clipped to [-1, 1], is passed to p as if o were p."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        picked = torch.multinomial(p, 1, generator=generator).squeeze(-1)
        return torch.nn.functional.one_hot(picked, p.shape[-1]).to(p.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(-1, 1), None


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto {p : p >= 0, sum p = 1} (Duchi et al. 2008):
    p = max(v - tau, 0) with tau chosen so that the row sums to 1."""
    u, _ = v.sort(dim=-1, descending=True)
    cumulative = u.cumsum(-1) - 1
    index = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - cumulative / index) > 0).sum(-1, keepdim=True)  # how many entries stay positive
    tau = cumulative.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - tau).clamp(min=0)


@register
class UnlearnDiffAtk(Attack):
    """UnlearnDiffAtk: prefix tokens that lower the erased model's own denoising loss on concept pictures."""

    name = "unlearndiffatk"
    config_class = UnlearnDiffAtkConfig
    world_budgets = {"emoji": {"steps": 200, "batch_size": 4, "n_images": 16}}

    def pictures_needed(self, target: AttackTarget) -> dict[str, int]:
        return {target.prompt: self.config.n_images}

    def run(self, pipe, target: AttackTarget, sampling: Sampling, seed: int):
        cfg = self.config
        generator = self.generator(seed, target)
        prompt = SlotPrompt.build(pipe.tokenizer, "{} " * cfg.tokens + target.prompt)
        vocab = allowed_tokens(pipe.tokenizer)
        table = token_table(pipe)[vocab].float()  # [V', d]: the tokens a prefix may use
        timer = Timer()
        with frozen(pipe.text_encoder, pipe.unet, pipe.vae):
            latents = encode_pictures(pipe, target.pictures[target.prompt][: cfg.n_images])
            probe = NoisyBatch.draw(pipe, latents, cfg.probe, generator)
            if cfg.space == "tokens":
                variable = torch.full((cfg.tokens, len(vocab)), 1.0 / len(vocab), requires_grad=True)
            else:
                start = torch.randint(0, len(vocab), (cfg.tokens,), generator=generator)
                variable = table[start].clone().requires_grad_(True)
            initial = self._prefix(variable.detach(), table)
            optimizer = torch.optim.Adam([variable], lr=cfg.lr, weight_decay=cfg.weight_decay)
            losses = []
            for _ in range(cfg.steps):
                if cfg.space == "tokens":
                    vectors = _StraightThroughSample.apply(variable, generator) @ table
                else:
                    vectors = variable
                batch = NoisyBatch.draw(pipe, latents, cfg.batch_size, generator)
                loss = denoising_loss(pipe, batch, encode(pipe, prompt, vectors))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if cfg.space == "tokens":
                    with torch.no_grad():
                        variable.copy_(project_to_simplex(variable))
                losses.append(loss.item())
            final = self._prefix(variable.detach(), table)
            with torch.no_grad():
                cond = encode(pipe, prompt, final)
                plain = encode(pipe, SlotPrompt.build(pipe.tokenizer, target.prompt))
                details = {
                    "loss_initial": float(denoising_loss(pipe, probe, encode(pipe, prompt, initial))),
                    "loss_final": float(denoising_loss(pipe, probe, cond)),
                    "loss_plain_prompt": float(denoising_loss(pipe, probe, plain)),
                }
        seconds = timer()
        text = None
        if cfg.space == "tokens":
            text = prompt.text(pipe.tokenizer, vocab[variable.detach().argmax(-1)])
        details["ends_with"] = "prefix"
        if cfg.keep_better and details["loss_plain_prompt"] <= details["loss_final"]:
            cond, text, details["ends_with"] = plain, target.prompt, "plain prompt"
        timer = Timer()
        images = draw(pipe, cond, sampling)
        return self.result(target, sampling, seed, images=images, steps=cfg.steps, seconds=seconds,
                           sampling_seconds=timer(), prompt=text, embeddings=cond.detach().cpu(),
                           token_vectors=final.cpu(), losses=losses, details=details)

    def _prefix(self, variable: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The prefix input vectors [k, d] the variables stand for now: the most likely token of each
        position (tokens), or the vectors themselves (embeddings)."""
        return table[variable.argmax(-1)] if self.config.space == "tokens" else variable.clone()
