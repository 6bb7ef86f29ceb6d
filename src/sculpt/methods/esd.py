"""ESD, Erased Stable Diffusion (Gandikota et al., ICCV 2023): the model is fine-tuned toward the
frozen model's *negatively guided* prediction, so that conditioning on the concept moves away from
it as classifier-free guidance would move toward it:

    x_t    = a partial DDIM sampling run of the frozen model on the concept prompt c, from noise
             to a random step (guidance `start_guidance`)
    target = eps*(x_t, t; "") - eta (eps*(x_t, t; c) - eps*(x_t, t; ""))        eps* frozen
    L      = || eps_theta(x_t, t; c) - target ||^2

ESD-x (`esd-x`) trains the cross-attention (attn2) only: the concept's word loses its effect,
neighbours suffer little. ESD-u (`esd-u`) trains everything except cross-attention: the concept is
erased whatever prompt leads to it, at a larger cost to other concepts. ESD erases one concept per
run; a stage with several concepts erases them in turn, each against the model at its own start.

Paper defaults: 1000 iterations, Adam lr 1e-5 (constant), eta 1, batch 1, DDIM 50 steps with
guidance 3 for x_t. Differences from the authors' code: x_t is sampled by the frozen model (the
code samples with the model being trained) and t is the DDIM timestep x_t is at (the code draws t
from the matching 1000/ddim_steps-wide interval); ESD-u trains every non-attn2 tensor (the code
also leaves out the output and time-embedding layers).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from sculpt.data.prepare import ConceptData
from sculpt.methods.base import ErasureMethod, MethodConfig, register
from sculpt.models.loading import cross_attention_params, non_cross_attention_params
from sculpt.stage import StageContext, check_finite, mse


class ESDConfig(MethodConfig):
    train: Literal["cross_attention", "non_cross_attention"] = Field(
        "cross_attention", description="ESD-x: attn2 only; ESD-u: everything but attn2")
    iterations: int = Field(1000, ge=1, description="per concept")
    lr: float = Field(1e-5, gt=0, description="Adam, constant")
    eta: float = Field(1.0, ge=0, description="negative guidance scale")
    batch_size: int = Field(1, ge=1)
    ddim_steps: int = Field(50, ge=1, description="sampling schedule for x_t; a random prefix of it is run")
    start_guidance: float = Field(3.0, ge=0, description="classifier-free guidance while sampling x_t")


class ESDUConfig(ESDConfig):
    train: Literal["cross_attention", "non_cross_attention"] = "non_cross_attention"


@torch.no_grad()
def sample_until(ctx: StageContext, frozen: dict[str, torch.Tensor], emb: torch.Tensor, shape: tuple[int, ...],
                 steps: int, ddim_steps: int, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the first `steps` of a `ddim_steps` DDIM schedule of the frozen model on `emb` (with
    classifier-free guidance) from pure noise. Returns x_t and the timestep t it is at."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(ctx.pipe.scheduler.config)
    scheduler.set_timesteps(ddim_steps, device=ctx.device)
    x = ctx.noise_like(torch.empty(shape, device=ctx.device)) * scheduler.init_noise_sigma
    n = len(emb)
    uncond = ctx.empty_embeds.to(ctx.device).expand(n, -1, -1)
    for t in scheduler.timesteps[:steps]:
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        e_u, e_c = ctx.predict_with(frozen, x_in, t.expand(2 * n), torch.cat([uncond, emb])).chunk(2)
        x = scheduler.step(e_u + guidance * (e_c - e_u), t, x).prev_sample  # eps_u + g (eps_c - eps_u)
    return x, scheduler.timesteps[steps].expand(n)


@register
class ESD(ErasureMethod):
    """ESD-x: fine-tune cross-attention toward negative guidance away from the concept (Gandikota et al. 2023)."""

    name = "esd-x"
    config_class = ESDConfig

    def trainable_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        if self.config.train == "cross_attention":
            return cross_attention_params(unet)
        return non_cross_attention_params(unet)

    def steps_per_stage(self) -> int:
        return self.config.iterations

    def loss(self, ctx: StageContext, model: nn.Module, frozen: dict[str, torch.Tensor], d: ConceptData):
        """|| eps_theta(x_t, t; c) - [eps*(x_t, t; "") - eta (eps*(x_t, t; c) - eps*(x_t, t; ""))] ||^2"""
        cfg = self.config
        _, c, _ = ctx.concept_batch(cfg.batch_size, [d])
        steps = int(torch.randint(0, cfg.ddim_steps, (1,), generator=ctx.generator))
        x_t, t = sample_until(ctx, frozen, c, (len(c), *d.latents.shape[1:]), steps, cfg.ddim_steps,
                              cfg.start_guidance)
        empty = ctx.empty_embeds.to(ctx.device).expand(len(c), -1, -1)
        e_0, e_c = ctx.predict_with(frozen, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([empty, c])).chunk(2)
        target = e_0 - cfg.eta * (e_c - e_0)
        return mse(ctx.predict(model, x_t, t, c), target)

    def fit_stage(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.config
        params = self.trainable_parameters(ctx.unet)
        last = {}
        for d in ctx.concepts:  # one concept per ESD run
            frozen = {n: p.detach().clone() for n, p in params.items()}  # eps*: the model at this run's start
            model, optimizer, _ = ctx.prepare_training(params, cfg.lr, cfg.iterations, schedule="constant")
            for step in range(cfg.iterations):
                loss = self.loss(ctx, model, frozen, d)
                check_finite(L_esd=loss)
                ctx.accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ctx.log({"step": step, "concept": d.name, "loss": round(loss.item(), 6)})
                last[d.name] = loss.item()
            del frozen
            ctx.finish_training()
            ctx.accelerator.free_memory()  # accelerate keeps every prepared optimizer (its Adam state) otherwise
        return {"final_loss": last}


@register
class ESDU(ESD):
    """ESD-u: the same negative-guidance fine-tuning, of everything except cross-attention (Gandikota et al. 2023)."""

    name = "esd-u"
    config_class = ESDUConfig
