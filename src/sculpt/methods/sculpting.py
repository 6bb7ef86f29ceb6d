"""Sculpting Memory (Li et al., ICCV 2025): Dynamic Mask + Concept-Aware Loss + distillation.

Per stage (one concept when sequential, all of them when simultaneous), only the cross-attention
projections are trained, and of their weights only the entries in the Dynamic Mask
(`dynamic_mask.py`). One timestep t is shared by all batches of a step:

    L_f  = || eps_theta(x_c, t; c) - sg[eps_theta(x_c, t; s)] ||^2     concept -> its superclass
    L_a  = || eps_theta(x_s, t; s) - eps ||^2                         superclass stays intact
    L_kd = || eps_theta(x, t; p) - eps_teacher(x, t; p) ||^2          on superclass data and on the
                                                                       prompts of earlier concepts
    L    = L_f + lambda_a L_a + lambda_kd L_kd

The teacher is the model at the start of the stage (it has already forgotten earlier concepts).
After each epoch the weights with the lowest mean L_f are kept; the next stage starts from them.

`reference=True` reproduces the authors' published script where it differs from the paper:
no distillation (its KD loss is overwritten before backward), no freeze mask (never written),
importance as |sum of signed grads|. (Their importance aliasing bug is not reproduced: it lets
masked-out weights move, which no comparison needs.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import nn

from sculpt.methods.base import ErasureMethod, MethodConfig, register
from sculpt.methods.dynamic_mask import DynamicMask, drop_ratio, reset_optimizer_state
from sculpt.models.loading import cross_attention_params
from sculpt.stage import StageContext, check_finite, mse


class SculptingConfig(MethodConfig):
    """Defaults are the published configuration for SD 1.4."""

    lr: float = Field(3e-6, gt=0, description="Adam, one-cycle cosine schedule")
    batch_size: int = Field(2, ge=1, description="per batch kind (concept, superclass, earlier concepts)")
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    warmup_steps: int = Field(50, ge=0, description="importance accumulation before the first mask")
    mask_ratio: float = Field(0.5, gt=0, le=1, description="p: density of each matrix's mask")
    mask_update_every: int = Field(100, ge=1, description="K: steps between drop/grow updates")
    drop_ratio: float = Field(0.2, ge=0, le=1, description="tau_0: initial turnover")
    mask_update_stop: float = Field(0.8, ge=0, le=1, description="no updates after this share of steps")
    lambda_align: float = Field(0.25, ge=0)
    lambda_kd: float = Field(0.25, ge=0)
    freeze_fraction: float = Field(
        0.05, ge=0, le=1,
        description="share of each matrix frozen after a stage (its most-changed entries); 1 = all changed",
    )
    select_best_epoch: bool = True
    reference: bool = Field(False, description="reproduce the authors' script (KD off, no freeze)")


@register
class Sculpting(ErasureMethod):
    """Sculpting Memory: Dynamic Mask on cross-attention + concept-to-superclass loss + distillation (Li et al. 2025)."""

    name = "sculpting"
    config_class = SculptingConfig

    def __init__(self, config: SculptingConfig | None = None):
        super().__init__(config)
        self.frozen: dict[str, torch.Tensor] = {}  # the global freeze mask, grown stage by stage

    def trainable_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        return cross_attention_params(unet)

    def steps_per_stage(self) -> int:
        return self.config.epochs * self.config.steps_per_epoch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"frozen.{n}": m.cpu() for n, m in self.frozen.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.frozen = {n.removeprefix("frozen."): m.bool() for n, m in state.items() if n.startswith("frozen.")}

    # -- the loss ----------------------------------------------------------------------------------

    def losses(self, ctx: StageContext, model: nn.Module, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.config
        B = cfg.batch_size
        x_c, c, s_c = ctx.concept_batch(B)  # concept images, concept prompt, its superclass prompt
        x_s, s = ctx.anchor_batch(B)  # superclass images and prompt
        t = ctx.timesteps(1)  # one timestep shared by every batch of the step
        n_c, n_s = ctx.noise_like(x_c), ctx.noise_like(x_s)
        xt_c, xt_s = ctx.add_noise(x_c, n_c, t), ctx.add_noise(x_s, n_s, t)
        inputs, conds = [xt_c, xt_s], [c, s]
        use_kd = cfg.lambda_kd > 0 and not cfg.reference
        if use_kd and ctx.previous:  # earlier concepts' images under their own prompts
            x_p, c_p, _ = ctx.concept_batch(B, ctx.previous)
            xt_p = ctx.add_noise(x_p, ctx.noise_like(x_p), t)
            inputs.append(xt_p)
            conds.append(c_p)
        x_in = torch.cat(inputs)
        pred = ctx.predict(model, x_in, t.expand(len(x_in)), torch.cat(conds))  # one batched forward
        pred_c, pred_s, pred_p = pred[:B], pred[B : 2 * B], pred[2 * B :]

        with torch.no_grad():
            target_f = ctx.predict(model, xt_c, t.expand(B), s_c)  # sg[eps_theta(x_c, t; s)]
        out = {
            "L_f": mse(pred_c, target_f),
            "L_a": mse(pred_s, ctx.target(x_s, n_s, t.expand(B))),
        }
        if use_kd:
            kd_in = x_in[B:]
            kd_cond = torch.cat(conds[1:])
            teacher_out = ctx.predict_with(teacher, kd_in, t.expand(len(kd_in)), kd_cond)
            out["L_kd"] = mse(torch.cat([pred_s, pred_p]), teacher_out)
        else:
            out["L_kd"] = torch.zeros((), device=pred.device)
        out["loss"] = out["L_f"] + cfg.lambda_align * out["L_a"] + cfg.lambda_kd * out["L_kd"]
        return out

    def warmup_loss(self, ctx: StageContext, model: nn.Module) -> torch.Tensor:
        """Plain denoising on the concept images: || eps_theta(x_c, t; c) - eps ||^2."""
        x_c, c, _ = ctx.concept_batch(self.config.batch_size)
        t = ctx.timesteps(len(x_c))
        noise = ctx.noise_like(x_c)
        return mse(ctx.predict(model, ctx.add_noise(x_c, noise, t), t, c), ctx.target(x_c, noise, t))

    # -- the stage ---------------------------------------------------------------------------------

    def fit_stage(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.config
        params = self.trainable_parameters(ctx.unet)
        weights = {n: p for n, p in params.items() if n.endswith("weight")}
        teacher = {n: p.detach().clone() for n, p in params.items()}  # frozen: the model at stage start
        total = cfg.epochs * cfg.steps_per_epoch
        model, optimizer, lr_sched = ctx.prepare_training(params, cfg.lr, total)
        frozen = {} if cfg.reference else self.frozen
        mask = DynamicMask(weights, cfg.mask_ratio, frozen, signed_importance=cfg.reference)

        # 1. Warm-up: accumulate gradient importance, no optimiser step.
        for _ in range(cfg.warmup_steps):
            ctx.accelerator.backward(self.warmup_loss(ctx, model))
            mask.accumulate()
            optimizer.zero_grad(set_to_none=True)
        mask.initialise()
        density = mask.current_density()  # changes only when the mask does: not recounted every step

        # 2. Masked optimisation with periodic drop/grow and best-epoch selection.
        best = {"L_f": float("inf"), "epoch": -1, "weights": None}
        turnover, step = 0.0, 0
        # Drop/grow happens at multiples of K up to mask_update_stop of the stage; importance gathered
        # after the last of them would never be read.
        last_update = math.floor(cfg.mask_update_stop * total / cfg.mask_update_every) * cfg.mask_update_every
        for epoch in range(cfg.epochs):
            epoch_lf = 0.0
            for _ in range(cfg.steps_per_epoch):
                terms = self.losses(ctx, model, teacher)
                check_finite(**{k: v for k, v in terms.items() if k != "loss"})
                ctx.accelerator.backward(terms["loss"])
                if step < last_update:
                    mask.accumulate()  # on the full gradient: inactive entries need importance to grow
                mask.mask_gradients()
                optimizer.step()
                lr_sched.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % cfg.mask_update_every == 0 and step <= cfg.mask_update_stop * total:
                    turnover, dropped = mask.update(drop_ratio(step, total, cfg.drop_ratio))
                    reset_optimizer_state(optimizer, weights, dropped)
                    density = mask.current_density()
                epoch_lf += terms["L_f"].item()
                ctx.log({
                    "step": step, "epoch": epoch,
                    **{k: round(v.item(), 6) for k, v in terms.items()},
                    "density": round(density, 4), "turnover": round(turnover, 4),
                    "lr": lr_sched.get_last_lr()[0],
                })
            epoch_lf /= cfg.steps_per_epoch
            if not cfg.select_best_epoch or epoch_lf < best["L_f"]:
                best = {"L_f": epoch_lf, "epoch": epoch,
                        "weights": {n: p.detach().clone() for n, p in params.items()}}

        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best["weights"][n])
        ctx.finish_training()
        self.last_mask = mask  # kept for inspection (tests, reports)
        if not cfg.reference:
            self.frozen = {n: m.cpu() for n, m in mask.frozen_after_stage(teacher, cfg.freeze_fraction).items()}
        frozen_share = (
            sum(int(m.sum()) for m in self.frozen.values()) / sum(m.numel() for m in self.frozen.values())
            if self.frozen else 0.0
        )
        return {"best_epoch": best["epoch"], "best_L_f": best["L_f"], "steps": step,
                "mask_density": density, "frozen_share": frozen_share}
