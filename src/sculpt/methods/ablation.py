"""Concept Ablation, AC (Kumari et al., ICCV 2023), the model-based variant: on images of the
anchor concept (the superclass), the prediction under the target concept's prompt is pulled onto
the model's own prediction under the anchor prompt, so the concept's prompt now draws the anchor:

    L_abl = || eps_theta(x_t, t; c_target) - sg[eps_theta(x_t, t; c_anchor)] ||^2      x_0 ~ anchor images
    L_reg = || eps_theta(x_t, t; c_anchor) - eps ||^2                                   (optional, off)
    L     = L_abl + prior_loss_weight * L_reg

Only the cross-attention key and value projections are trained (the paper's "cross-attn"
parameter group). One concept per run; a stage with several concepts ablates them in turn.

Defaults follow the authors' README for objects (diffusers/train.py): lr 2e-6 per image with
`--scale_lr`, i.e. 2e-6 x global batch 8 = 1.6e-5 (Adam, constant), batch 8, gradient norm clipped
at 1.0, and no regulariser (the README adds `--with_prior_preservation` only where the target's prompt
overlaps the anchor's, as "grumpy cat" -> "cat", and for nudity; `prior_loss_weight: 1` turns it on at
the authors' weight).
Remaining differences from the authors' code:
- 400 steps (the README's object and style runs: 100 steps at global batch 8);
- the anchor images are the stage data's superclass images and the prompts the data's own (the
  authors generate many captions with the target word swapped in, and augment the images with
  random crops and a loss mask);
- the regulariser, when on, is the anchor prompt's denoising loss on the same noisy anchor image
  (the authors: on separate class images, with the learning rate doubled by `--scale_lr`);
- Adam without weight decay (the authors: AdamW, 0.01).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from sculpt.data.prepare import ConceptData
from sculpt.methods.base import ErasureMethod, MethodConfig, register
from sculpt.models.cross_attention import key_value_params
from sculpt.stage import StageContext, check_finite, mse


class AblationConfig(MethodConfig):
    steps: int = Field(400, ge=1, description="per concept")
    lr: float = Field(1.6e-5, gt=0, description="Adam, constant (the README's 2e-6 x batch 8, --scale_lr)")
    batch_size: int = Field(8, ge=1)
    prior_loss_weight: float = Field(0.0, ge=0, description="weight of the denoising loss on anchor images; "
                                     "0 = off (the authors' default), 1 = their --with_prior_preservation")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm (the authors: 1.0); null: no clipping")


@register
class ConceptAblation(ErasureMethod):
    """Concept Ablation (model-based): the concept prompt predicts what the anchor prompt does (Kumari et al. 2023)."""

    name = "ac"
    config_class = AblationConfig

    def trainable_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        return key_value_params(unet)

    def steps_per_stage(self) -> int:
        return self.config.steps

    def losses(self, ctx: StageContext, model: nn.Module, d: ConceptData) -> dict[str, torch.Tensor]:
        B = self.config.batch_size
        x_s, s = ctx.anchor_batch(B, [d])  # anchor images and the anchor prompt
        _, c, _ = ctx.concept_batch(B, [d])  # the target concept's prompts
        t = ctx.timesteps(B)
        noise = ctx.noise_like(x_s)
        x_t = ctx.add_noise(x_s, noise, t)
        if self.config.prior_loss_weight > 0:
            pred_c, pred_s = ctx.predict(model, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([c, s])).chunk(2)
        else:  # the anchor prediction is only the (stopped-gradient) target, as in the authors' code
            pred_c = ctx.predict(model, x_t, t, c)
            with torch.no_grad():
                pred_s = ctx.predict(model, x_t, t, s)
        out = {"L_abl": mse(pred_c, pred_s.detach()), "L_reg": mse(pred_s, ctx.target(x_s, noise, t))}
        out["loss"] = out["L_abl"] + self.config.prior_loss_weight * out["L_reg"]
        return out

    def fit_stage(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.config
        params = self.trainable_parameters(ctx.unet)
        last = {}
        for d in ctx.concepts:
            model, optimizer, _ = ctx.prepare_training(params, cfg.lr, cfg.steps, schedule="constant")
            for step in range(cfg.steps):
                terms = self.losses(ctx, model, d)
                check_finite(**terms)
                ctx.accelerator.backward(terms["loss"])
                if cfg.max_grad_norm is not None:
                    ctx.accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ctx.log({"step": step, "concept": d.name, **{k: round(v.item(), 6) for k, v in terms.items()}})
                last[d.name] = terms["L_abl"].item()
            ctx.finish_training()
            ctx.accelerator.free_memory()  # accelerate keeps every prepared optimizer (its Adam state) otherwise
        return {"final_L_abl": last}
