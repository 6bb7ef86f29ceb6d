"""Sculpting Memory (Li et al., ICCV 2025): Dynamic Mask + Concept-Aware Loss + distillation.

Per stage (one concept when sequential, all of them when simultaneous), only the cross-attention
projections are trained, and of their weights only the entries in the Dynamic Mask
(`dynamic_mask.py`). Each step draws B per-sample timesteps t_1..t_B; item i of every batch of the
step (concept, superclass, earlier concepts) is noised at t_i, as the authors' script pairs its
concept and superclass batches:

    L_f  = || eps_theta(x_c, t; c) - sg[eps_theta(x_c, t; s)] ||^2     concept -> its superclass
    L_a  = || eps_theta(x_s, t; s) - eps ||^2                         superclass stays intact
    L_kd = || eps_theta(x, t; p) - eps_teacher(x, t; p) ||^2          on superclass data and on the
                                                                       prompts of earlier concepts
    L    = L_f + lambda_a L_a + lambda_kd L_kd

Beyond the paper (`lambda_nb` > 0, on by default; off with `reference`): neighbour-aware preservation.
None of the three terms looks at the prompts of the concepts *next to* the target, and those are the
ones an erasure hurts (erasing poodle takes dog and guide dog down). The neighbours at risk N(c) (the
k classes nearest c in the text encoder's space, sculpt.data.neighbours, or the spec's list, for
every concept erased so far) are distilled on their own prompts and on their own images x_n:

    L_nb = || eps_theta(x_n, t; n) - eps_teacher(x_n, t; n) ||^2,   n in N(c)
    L    = L_f + lambda_a L_a + lambda_kd L_kd + lambda_nb L_nb

Beyond the paper (the run's `check:`, on by default): a stage ends when its concepts are gone. After
the published budget (and its best epoch), sculpt.presence counts how many check pictures still show
each concept; while that share is above `check.max_share`, the stage goes on for another round of
`check.round_epochs` epochs (`_extend`: same losses, teacher, mask and freeze mask, no more drop/grow,
a fresh one-cycle schedule), at most `check.max_rounds` rounds; a concept still drawn then is named
in the stage's summary, the ledger and the model card.

The teacher is the model at the start of the stage (it has already forgotten earlier concepts).
After each epoch the weights with the lowest mean L_f are kept; the next stage starts from them.
Images are drawn without replacement: an epoch walks the data in a shuffled order.

The schedule (`stage_schedule`) is the paper's: a W-step warm-up, then E epochs of S optimiser
steps; every K steps the mask turns over tau(e) = tau_0 (1 + cos(pi e / E)) / 2 of its entries,
e the current epoch, while e < 0.8 E (published: updates at steps 100..400, tau 0.195, 0.159,
0.100, 0.041).

`reference=True` reproduces the authors' published script where it differs from the paper:
no distillation (its KD loss is overwritten before backward), no freeze mask (never written),
importance as |sum of signed grads|, Adam's moments kept on dropped entries (the script never
resets optimiser state inside a stage, so a dropped entry drifts on its momentum), and its step
count: the warm-up is the first W of the E*S steps (epoch 0 with W = S, which competes in
best-epoch selection with its denoising loss), so a stage takes E*S - W optimiser steps, the
one-cycle schedule is sized for E*S and never finishes, and K counts from the start of the warm-up.
What it still does differently from the script, each with its measured effect where it can matter
(benchmarks/reference_vs_script.py, docs/method-notes.md "The reference mode against the script"):
- update counts: round(tau * active) here, the script's max(1, floor(tau * active)); its first mask
  keeps every entry tied with the k-th score. Not measured: at most one entry per matrix, of about
  2,000 active in each emoji matrix.
- when W % K == 0 the script swaps entries a second time at step W, right after building the mask,
  from all-zero (tied) importance; here step W is a warm-up tick. Neither the published (W 50, K 100)
  nor the emoji settings (W 20, K 40) hit this case.
- its importance-aliasing bug (under accelerate < 0.28 it trains the first stage densely) is not
  reproduced: it lets masked-out weights move, which no comparison needs.
- data: latents are the cached posterior means (the script re-encodes its PNGs and samples the
  posterior every step); an epoch is S steps (the script's is one pass of its smaller loader). The
  training data itself is the spec's, not part of the method: prompts, synonyms and anchor pictures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from sculpt.io import optimizer_state_from_tensors, optimizer_state_to_tensors
from sculpt.methods.base import ErasureMethod, MethodConfig, register
from sculpt.methods.dynamic_mask import DynamicMask, drop_ratio, reset_optimizer_state
from sculpt.models.loading import cross_attention_params
from sculpt.stage import StageContext, mse


# Neighbour-aware preservation: weight, count and siblings chosen on the emoji world's development
# concept list (docs/results.md: lambda_nb in {0, 1, 4} with k = 4, then siblings on), never on its ten
# test targets; untested on SD (where no taxonomy gives siblings).
NB_WEIGHT = 4.0
NB_COUNT = 4
# fp16 overflow steps tried again in a row before giving up (each halves the loss scale: 2^-30 of it).
MAX_SKIPPED_STEPS = 30


class SculptingConfig(MethodConfig):
    """Defaults are the published configuration for SD 1.4."""

    lr: float = Field(3e-6, gt=0, description="Adam, one-cycle cosine schedule")
    batch_size: int = Field(2, ge=1, description="per batch kind (concept, superclass, earlier concepts)")
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    warmup_steps: int = Field(
        50, ge=0, description="importance accumulation before the first mask (at least 1 unless mask_ratio is 1)")
    mask_ratio: float = Field(0.5, gt=0, le=1, description="p: density of each matrix's mask")
    mask_update_every: int = Field(100, ge=1, description="K: steps between drop/grow updates")
    drop_ratio: float = Field(0.2, ge=0, le=1, description="tau_0: initial turnover")
    mask_update_stop: float = Field(0.8, ge=0, le=1, description="no updates after this share of steps")
    lambda_align: float = Field(0.25, ge=0)
    lambda_kd: float = Field(0.25, ge=0)
    lambda_nb: float = Field(
        NB_WEIGHT, ge=0, description="neighbour-aware preservation (not in the paper): weight of L_nb; 0 = off")
    neighbours: int = Field(NB_COUNT, ge=0, description="neighbours at risk kept per concept (when the spec lists none)")
    neighbour_siblings: bool = Field(
        True, description="also keep the concept's siblings under its superclass (worlds with a taxonomy; "
        "chosen on the emoji development list)")
    freeze_fraction: float = Field(
        0.05, ge=0, le=1,
        description="share of each matrix frozen after a stage (its most-changed entries); 1 = all changed",
    )
    select_best_epoch: bool = True
    reference: bool = Field(
        False, description="reproduce the authors' script (KD off, no freeze, warm-up inside the E*S steps)")

    @model_validator(mode="after")
    def _warmup_gives_importance(self) -> "SculptingConfig":
        # The first mask is the top p of each matrix by the warm-up's importance; with no warm-up every
        # score is 0 and topk would pick a positional block of entries (rows 4..7 of each matrix, say).
        if self.warmup_steps == 0 and self.mask_ratio < 1:
            raise ValueError("warmup_steps is 0: the first mask (the top mask_ratio of each matrix by warm-up "
                             "importance) would be chosen from all-zero scores; use warmup_steps >= 1, or "
                             "mask_ratio 1 (no mask)")
        return self

    @model_validator(mode="after")
    def _steps_left_after_warmup(self) -> "SculptingConfig":
        if self.reference and self.warmup_steps >= self.epochs * self.steps_per_epoch:
            raise ValueError(f"reference: the warm-up ({self.warmup_steps} steps) is inside the stage's "
                             f"epochs x steps_per_epoch = {self.epochs * self.steps_per_epoch} steps and leaves "
                             "no optimiser step")
        return self


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

    def neighbours_wanted(self) -> int:
        cfg = self.config
        return cfg.neighbours if cfg.lambda_nb > 0 and not cfg.reference else 0

    def keeps_siblings(self) -> bool:
        return self.config.neighbour_siblings and self.config.lambda_nb > 0 and not self.config.reference

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"frozen.{n}": m.cpu() for n, m in self.frozen.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.frozen = {n.removeprefix("frozen."): m.bool() for n, m in state.items() if n.startswith("frozen.")}

    # -- the loss ----------------------------------------------------------------------------------

    def losses(self, ctx: StageContext, model: nn.Module, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.config
        B = ctx.per_process(cfg.batch_size)  # cfg.batch_size is the global batch over all processes
        x_c, c, s_c = ctx.concept_batch(B, replace=False)  # concept images, concept prompt, its superclass prompt
        x_s, s = ctx.anchor_batch(B, replace=False)  # superclass images and prompt
        t = ctx.timesteps(B)  # t_i: item i of every batch below is noised at t_i
        n_c, n_s = ctx.noise_like(x_c), ctx.noise_like(x_s)
        xt_c, xt_s = ctx.add_noise(x_c, n_c, t), ctx.add_noise(x_s, n_s, t)
        inputs, conds = [xt_c, xt_s], [c, s]
        use_kd = cfg.lambda_kd > 0 and not cfg.reference
        if use_kd and ctx.previous:  # earlier concepts' images under their own prompts
            x_p, c_p, _ = ctx.concept_batch(B, ctx.previous, replace=False)
            xt_p = ctx.add_noise(x_p, ctx.noise_like(x_p), t)
            inputs.append(xt_p)
            conds.append(c_p)
        use_nb = cfg.lambda_nb > 0 and not cfg.reference and bool(ctx.neighbours)
        if use_nb:  # the neighbours at risk, on their own images and prompts
            x_n, c_n = ctx.neighbour_batch(B)
            inputs.append(ctx.add_noise(x_n, ctx.noise_like(x_n), t))
            conds.append(c_n)
        x_in = torch.cat(inputs)
        pred = ctx.predict(model, x_in, t.repeat(len(inputs)), torch.cat(conds))  # one batched forward
        n_kd = B * (len(inputs) - 2 - use_nb)  # earlier concepts' items
        pred_c, pred_s = pred[:B], pred[B : 2 * B]
        pred_p, pred_n = pred[2 * B : 2 * B + n_kd], pred[2 * B + n_kd :]

        with torch.no_grad():
            target_f = ctx.predict(model, xt_c, t, s_c)  # sg[eps_theta(x_c, t; s)]
        out = {
            "L_f": mse(pred_c, target_f),
            "L_a": mse(pred_s, ctx.target(x_s, n_s, t)),
        }
        zero = torch.zeros((), device=pred.device)
        out["L_kd"], out["L_nb"] = zero, zero
        if use_kd or use_nb:  # one teacher forward for the rows a distillation term reads, no other
            first = B if use_kd else 2 * B + n_kd  # superclass block onward, or the neighbours alone
            teacher_out = ctx.predict_with(teacher, x_in[first:], t.repeat(len(inputs))[first:],
                                           torch.cat(conds)[first:])
            if use_kd:
                out["L_kd"] = mse(torch.cat([pred_s, pred_p]), teacher_out[B - first : 2 * B + n_kd - first])
            if use_nb:
                out["L_nb"] = mse(pred_n, teacher_out[2 * B + n_kd - first :])
        out["loss"] = (out["L_f"] + cfg.lambda_align * out["L_a"] + cfg.lambda_kd * out["L_kd"]
                       + cfg.lambda_nb * out["L_nb"])
        return out

    def warmup_loss(self, ctx: StageContext, model: nn.Module) -> torch.Tensor:
        """Plain denoising on the concept images: || eps_theta(x_c, t; c) - eps ||^2, t per sample."""
        x_c, c, _ = ctx.concept_batch(ctx.per_process(self.config.batch_size), replace=False)
        t = ctx.timesteps(len(x_c))
        noise = ctx.noise_like(x_c)
        return mse(ctx.predict(model, ctx.add_noise(x_c, noise, t), t, c), ctx.target(x_c, noise, t))

    # -- the stage ---------------------------------------------------------------------------------

    def fit_stage(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.config
        params = self.trainable_parameters(ctx.unet)
        weights = {n: p for n, p in params.items() if n.endswith("weight")}
        teacher = {n: p.detach().clone() for n, p in params.items()}  # frozen: the model at stage start
        ticks = stage_schedule(cfg)
        # the one-cycle schedule spans E*S optimiser steps (the authors' script takes E*S - W of them)
        model, optimizer, lr_sched = ctx.prepare_training(params, cfg.lr, cfg.epochs * cfg.steps_per_epoch)
        frozen = {} if cfg.reference else self.frozen
        mask = DynamicMask(weights, cfg.mask_ratio, frozen, signed_importance=cfg.reference)
        # Importance gathered after the last drop/grow would never be read.
        last_read = max([i for i, tick in enumerate(ticks) if tick.tau is not None or tick.warmup], default=-1)

        best = {"L_f": float("inf"), "epoch": -1, "weights": None}
        loop = {"tick": 0, "step": 0, "epoch_lf": 0.0, "turnover": 0.0, "density": 0.0, "checks": []}
        if ctx.resume is not None:  # a mid-stage checkpoint of this stage: go on from its tick
            best, loop = self._restore(ctx, params, optimizer, lr_sched, mask, ctx.resume)
        else:
            ctx.start_presence_check()
        step, epoch_lf, density = loop["step"], loop["epoch_lf"], loop["density"]
        state = {"turnover": loop["turnover"], "skipped_in_a_row": 0}
        i = loop["tick"]
        while i < len(ticks):
            tick = ticks[i]
            if tick.warmup:
                # 1. Warm-up: accumulate gradient importance, no optimiser step.
                loss = self.warmup_loss(ctx, model)
                if cfg.reference:  # the script's epoch 0 loss is this denoising loss
                    epoch_lf += ctx.loss_values(L_warmup=loss)["L_warmup"]
                ctx.accelerator.backward(loss)
                if ctx.unscale_gradients(optimizer):
                    mask.accumulate()
                ctx.step_without_optimizer()
                optimizer.zero_grad(set_to_none=True)
            else:
                if not mask.initialised:  # the first masked step: top-p by the warm-up's importance
                    mask.initialise()
                    density = mask.current_density()  # changes only with the mask: not recounted per step
                # 2. Masked optimisation with periodic drop/grow.
                values = self._step(ctx, model, optimizer, lr_sched, mask, teacher, weights, tick.tau,
                                    accumulate=i <= last_read, state=state)
                if values is None:  # an fp16 overflow: no step was taken, the tick is tried again
                    continue
                step += 1
                density = mask.current_density() if tick.tau is not None else density
                epoch_lf += values["L_f"]
                self._log(ctx, step, tick.epoch, values, density, state["turnover"], lr_sched)
            end_of_epoch = i + 1 == len(ticks) or ticks[i + 1].epoch != tick.epoch
            if end_of_epoch and tick.epoch >= 0:  # 3. best-epoch selection on the mean L_f
                epoch_lf = ctx.mean_over_processes(epoch_lf / cfg.steps_per_epoch)  # the same epoch everywhere
                if not cfg.select_best_epoch or epoch_lf < best["L_f"]:
                    best = {"L_f": epoch_lf, "epoch": tick.epoch,
                            "weights": {n: p.detach().clone() for n, p in params.items()}}
            if end_of_epoch:
                epoch_lf = 0.0
            i += 1
            if ctx.progress_due():
                ctx.write_progress(*self._snapshot(ctx, params, optimizer, lr_sched, mask, best, {
                    "tick": i, "step": step, "epoch_lf": epoch_lf, "turnover": state["turnover"],
                    "density": density, "checks": loop["checks"]}))

        if not loop["checks"]:  # the published budget is spent: its best epoch is the result so far
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(best["weights"][n])
        # 4. Beyond the paper: go on while the concept is still drawn (sculpt.presence), bounded.
        checks = loop["checks"]
        if ctx.presence_check is not None:
            if not checks:
                checks.append(ctx.presence_check())
            while not ctx.concepts_gone(checks[-1]) and len(checks) <= ctx.check.max_rounds:
                step = self._extend(ctx, model, optimizer, mask, teacher, weights, step, density, len(checks),
                                    state)
                checks.append(ctx.presence_check())
                ctx.write_progress(*self._snapshot(ctx, params, optimizer, lr_sched, mask, best, {
                    "tick": len(ticks), "step": step, "epoch_lf": 0.0, "turnover": state["turnover"],
                    "density": density, "checks": checks}))
        ctx.finish_training()
        self.last_mask = mask  # kept for inspection (tests, reports)
        if not cfg.reference:
            self.frozen = {n: m.cpu() for n, m in mask.frozen_after_stage(teacher, cfg.freeze_fraction).items()}
        frozen_share = (
            sum(int(m.sum()) for m in self.frozen.values()) / sum(m.numel() for m in self.frozen.values())
            if self.frozen else 0.0
        )
        out = {"best_epoch": best["epoch"], "best_L_f": best["L_f"], "steps": step,
               "mask_density": density, "frozen_share": frozen_share}
        if checks:
            out["check"] = ctx.check_summary(checks)
        return out

    def _step(self, ctx, model, optimizer, lr_sched, mask, teacher, weights, tau, accumulate, state):
        """One masked optimiser step: the losses, the masked gradient, Adam, the schedule and, when
        `tau` is set, the mask's drop/grow. None when fp16 loss scaling skipped the step: no step was
        taken, so the schedule does not advance and the caller tries again (bounded)."""
        cfg = self.config
        terms = self.losses(ctx, model, teacher)
        values = ctx.loss_values(**{k: v for k, v in terms.items() if k != "loss"})  # one host sync
        ctx.accelerator.backward(terms["loss"])
        if accumulate and ctx.unscale_gradients(optimizer):
            mask.accumulate()  # on the full gradient: inactive entries need importance to grow
        mask.mask_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if getattr(optimizer, "step_was_skipped", False):
            state["skipped_in_a_row"] += 1
            if state["skipped_in_a_row"] > MAX_SKIPPED_STEPS:
                raise RuntimeError(f"{MAX_SKIPPED_STEPS} optimiser steps in a row overflowed under fp16 loss "
                                   "scaling; train in bf16 or fp32 (train.mixed_precision)")
            return None
        state["skipped_in_a_row"] = 0
        lr_sched.step()
        if tau is not None:
            state["turnover"], dropped = mask.update(tau)
            if not cfg.reference:  # the authors' script keeps Adam's moments on dropped entries
                reset_optimizer_state(optimizer, weights, dropped)
        return values

    def _extend(self, ctx, model, optimizer, mask, teacher, weights, step, density, round_no, state) -> int:
        """One extra round after a check found the concept still drawn: `check.round_epochs` epochs of
        S steps with the same losses, teacher, mask (no more drop/grow) and freeze mask, on a fresh
        one-cycle schedule peaking at the stage's lr; the round's last weights are kept (no best-epoch
        selection: the check, not L_f, decides). Returns the step count after it."""
        cfg = self.config
        n = ctx.check.round_epochs * cfg.steps_per_epoch
        lr_sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=n,
                                                       anneal_strategy="cos")
        done = 0
        while done < n:
            values = self._step(ctx, model, optimizer, lr_sched, mask, teacher, weights, None, accumulate=False,
                                state=state)
            if values is None:
                continue
            done += 1
            step += 1
            self._log(ctx, step, cfg.epochs - 1 + round_no, values, density, state["turnover"], lr_sched)
        return step

    def _log(self, ctx, step, epoch, values, density, turnover, lr_sched) -> None:
        cfg = self.config
        ctx.log({
            "step": step, "epoch": epoch,
            **{k: round(v, 6) for k, v in values.items()},
            "loss": round(values["L_f"] + cfg.lambda_align * values["L_a"] + cfg.lambda_kd * values["L_kd"]
                          + cfg.lambda_nb * values["L_nb"], 6),
            "density": round(density, 4), "turnover": round(turnover, 4),
            "lr": lr_sched.get_last_lr()[0],
        })

    # -- mid-stage checkpoints: everything the loop above carries from one step to the next -----------

    def _snapshot(self, ctx, params, optimizer, lr_sched, mask, best, loop) -> tuple[dict, dict]:
        tensors = {f"params/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
        opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer.state_dict())
        tensors.update(opt_tensors)
        for kind, table in (("active", mask.active), ("ever", mask.ever_active), ("importance", mask.importance)):
            tensors.update({f"mask/{kind}/{n}": t.detach().cpu().contiguous() for n, t in table.items()})
        if best["weights"] is not None:
            tensors.update({f"best/{n}": t.detach().cpu().contiguous() for n, t in best["weights"].items()})
        sampling_tensors, sampling_meta = ctx.sampling_state()
        tensors.update(sampling_tensors)
        meta = {**loop, **sampling_meta, "optimizer": opt_meta,
                "scheduler": lr_sched.state_dict(), "mask_initialised": mask.initialised,
                "best_L_f": best["L_f"], "best_epoch": best["epoch"]}
        return tensors, meta

    def _restore(self, ctx, params, optimizer, lr_sched, mask, saved) -> tuple[dict, dict]:
        tensors, meta = saved
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"params/{n}"].to(p.device))
        optimizer.load_state_dict(optimizer_state_from_tensors(tensors, meta["optimizer"]))
        lr_sched.load_state_dict(meta["scheduler"])
        for kind, table in (("active", mask.active), ("ever", mask.ever_active), ("importance", mask.importance)):
            for n in table:
                table[n] = tensors[f"mask/{kind}/{n}"].to(table[n].device)
        mask.initialised = meta["mask_initialised"]
        ctx.restore_sampling_state(tensors, meta)
        best = {"L_f": meta["best_L_f"], "epoch": meta["best_epoch"],
                "weights": ({n: tensors[f"best/{n}"].to(p.device) for n, p in params.items()}
                            if meta["best_epoch"] >= 0 else None)}
        return best, {**{k: meta[k] for k in ("tick", "step", "epoch_lf", "turnover", "density")},
                      "checks": meta.get("checks", [])}


@dataclass(frozen=True)
class Tick:
    """One step of a stage: a warm-up step (importance only) or an optimiser step, and whether the
    mask turns over after it."""

    epoch: int  # -1: the paper's separate warm-up; 0..E-1 otherwise
    warmup: bool
    tau: float | None = None  # drop/grow this fraction of the active entries after the step


def stage_schedule(cfg: SculptingConfig) -> list[Tick]:
    """Every step of one stage, in order.

    Paper (default): W warm-up steps, then E epochs of S optimiser steps; after optimiser step s
    (1-based, epoch e = (s-1) // S) the mask turns over tau(e) when s % K == 0 and e < 0.8 E.
    Authors' script (reference): E*S steps in all, the first W of them the warm-up; the same rule
    with s counting from the start of the warm-up."""
    E, S, W, K = cfg.epochs, cfg.steps_per_epoch, cfg.warmup_steps, cfg.mask_update_every
    stop = math.floor(cfg.mask_update_stop * E + 1e-9)  # epochs that may update the mask

    def tau(s: int, e: int) -> float | None:
        return drop_ratio(e, E, cfg.drop_ratio) if s % K == 0 and e < stop else None

    if cfg.reference:
        return [Tick((s - 1) // S, s <= W, None if s <= W else tau(s, (s - 1) // S)) for s in range(1, E * S + 1)]
    return [Tick(-1, True)] * W + [Tick((s - 1) // S, False, tau(s, (s - 1) // S)) for s in range(1, E * S + 1)]
