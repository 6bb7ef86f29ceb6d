"""Forget-It-All, FIA (Deng et al., ICML 2026): training-free erasure by zeroing a small set of
weights of every feed-forward output projection (`ff.net.2`, "FFN2"), the weights whose input
neurons fire more for the concept than for a base prompt.

(1) Contrastive concept saliency (paper Eq. 1-2; the authors' code drops Eq. 1's cosine factor).
    Per layer l, denoising step t, input neuron j of FFN2 (C_in of them) and run k:

        n_{k,t,l,j} = || X^_{t,l,:,j} ||_2     X^: the FFN2 input with each position's row L2-normalised,
                                                 positions = pixels of the run's conditional and
                                                 unconditional (classifier-free guidance) passes
        S_{t,l,i,j} = |W_{l,i,j}| * max(0, mu_c - mu_b - sigma_b)_{t,l,j}

    mu_c: mean of n over the concept runs; mu_b, sigma_b: mean and (population) standard deviation
    over the base runs.

(2) Concept-sensitive neurons (Eq. 3-6).

        A_{l,i,j} = 1/2 mean_t S / max(mean_t S) + 1/2 mean_t 1[S_{t,l,i,j} > tau_{l,t}]
        tau_{l,t} = the k-th largest S_{t,l} with k = r1 * C_out * C_in
        Q_l = (top r2 * C_in of A per output row i) & (top r2 * C_out * C_in of A in the layer) & (A > 0)

(3) Multi-concept fusion (Eq. 7-8), over the C concepts of the stage:

        s_{l,i,j} = sum_c Q^(c)_{l,i,j};   prune where 0 < s < tau_ca,   tau_ca = max(2, ceil(alpha C))
        W_l <- W_l * (1 - prune_l)

    Neurons selected by at least tau_ca of the concepts are "concept-agnostic" and kept.

Data: run k is the stage's own cached data: concept image k (cycled) under one of the concept's
prompts for mu_c, superclass image k under the superclass prompt for mu_b, both noised with the same
noise to each of the first `saliency_steps` timesteps of an `inference_steps` schedule of the
model's scheduler, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. Activations are read by forward
pre-hooks on every FFN2 and reduced at once to [runs, C_in] per step, so memory is the saliency of
one layer at a time.

Defaults: r1 5%, r2 1% (the authors' FIAConfig default and the paper's "sufficient in most cases"
for objects; configs/object.yaml lowers it to 0.7% and raises three hard Imagenette classes to 3%,
which `r2_overrides` can reproduce by name), alpha 0.6, the first 10 of 50 steps, 30 prompt pairs.
Differences from the authors' code, and why:
- Inputs: the authors run the full sampler (guidance 7.5, one seed) on 30 hand-written prompt pairs
  "a <concept> in a <place>" vs "a <place>" and hook the first 10 steps of the trajectory. Here the
  runs are the stage's cached images noised to those steps (q(x_t | x_0) with x_0 the model's own
  pictures of the concept; at the noisiest steps this is close to the sampler's state), and the
  base prompt is the superclass (what every method here maps a concept onto) with its own images:
  no sampling, and no prompt list that this project's concepts do not come with.
- tau_ca is at least 2: with the published ceil(alpha C) a single concept (C = 1, every sequential
  stage, and the paper's single-concept explicit-content runs) has tau_ca = 1, so every selected
  neuron counts as concept-agnostic and nothing is pruned.
- A neuron with A = 0 is never selected (the authors' top-k fills up with arbitrary zero-sensitivity
  entries when fewer than k are positive).
- The saliency is never stored as a [T, C_out, C_in] tensor (|W| times a per-column contrast is
  formed one step and layer at a time); the authors' result is the same.
- Sequential stages: pruned weights stay zero (later stages only zero more of them), so the earlier
  concepts stay pruned; fusion counts the concepts of one stage.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from sculpt.methods.base import ErasureMethod, MethodConfig, register
from sculpt.stage import StageContext


class FIAConfig(MethodConfig):
    """Defaults: the authors' (FIAConfig, paper Appendix B.2)."""

    r1: float = Field(0.05, gt=0, le=1, description="temporal sparsity: share of a step's saliency counted as active")
    r2: float = Field(0.01, gt=0, le=1, description="spatial sparsity: top share per output row and per layer")
    r2_overrides: dict[str, float] = Field(default_factory=dict, description="r2 per concept name")
    alpha: float = Field(0.6, gt=0, le=1, description="concept-agnostic ratio: kept if selected by >= ceil(alpha C)")
    inference_steps: int = Field(50, ge=1, description="the schedule the saliency steps are taken from")
    saliency_steps: int = Field(10, ge=1, description="its first (noisiest) steps")
    runs: int = Field(30, ge=2, description="concept / base runs per concept (the authors: 30 prompt pairs)")
    unconditional: bool = Field(True, description="count the guidance's unconditional pass, as the authors' hooks do")
    batch_size: int = Field(10, ge=1, description="runs per forward pass (memory only)")


def ffn2_layers(unet: nn.Module) -> dict[str, nn.Linear]:
    """Every transformer block's feed-forward output projection (ff.net.2), what FIA prunes."""
    return {n: m for n, m in unet.named_modules() if n.endswith("ff.net.2") and isinstance(m, nn.Linear)}


class _ColumnNorms:
    """Forward pre-hooks on FFN2 layers: per sample of the batch, sum over positions of the squared
    row-normalised input, [B, C_in] per layer, added up over the passes until `take()`."""

    def __init__(self, layers: dict[str, nn.Linear]):
        self.sums: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            sq = F.normalize(x.float().flatten(1, -2), dim=-1).pow(2).sum(1)  # [B, C_in]
            self.sums[name] = self.sums[name] + sq if name in self.sums else sq
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        out, self.sums = {n: s.sqrt().cpu() for n, s in self.sums.items()}, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@register
class ForgetItAll(ErasureMethod):
    """FIA: zero the feed-forward weights whose neurons fire for the concept more than for its base (Deng et al. 2026)."""

    name = "fia"
    config_class = FIAConfig

    def trainable_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        return {f"{n}.weight": m.weight for n, m in ffn2_layers(unet).items()}

    # -- (1) activation statistics and saliency --------------------------------------------------------

    def saliency_timesteps(self, ctx: StageContext) -> torch.Tensor:
        scheduler = type(ctx.pipe.scheduler).from_config(ctx.pipe.scheduler.config)
        scheduler.set_timesteps(self.config.inference_steps)
        return scheduler.timesteps[: self.config.saliency_steps]

    @torch.no_grad()
    def column_norms(self, ctx: StageContext, data) -> dict[str, dict[str, torch.Tensor]]:
        """n for the concept and base runs: {"concept"|"base": {layer: [T, runs, C_in]}}."""
        cfg = self.config
        k = torch.arange(cfg.runs)
        g = torch.Generator().manual_seed(ctx.seed)
        # one noise for every run, as the authors seed every pipeline call alike: runs differ by image
        # and prompt, so sigma_b measures the base's variation, not the noise's
        noise = torch.randn((1, *data.latents.shape[1:]), generator=g).expand(cfg.runs, *data.latents.shape[1:])
        inputs = {
            "concept": (data.latents[k % len(data.latents)], data.prompt_embeds[k % len(data.prompt_embeds)]),
            "base": (data.anchor_latents[k % len(data.anchor_latents)], data.anchor_embeds.expand(cfg.runs, -1, -1)),
        }
        empty = ctx.empty_embeds if cfg.unconditional else None
        hooks = _ColumnNorms(ffn2_layers(ctx.unet))
        out: dict[str, dict[str, list]] = {kind: {} for kind in inputs}
        try:
            for kind, (x0, emb) in inputs.items():
                per_step: dict[str, list[torch.Tensor]] = {}
                for t in self.saliency_timesteps(ctx).tolist():
                    chunks: dict[str, list[torch.Tensor]] = {}
                    for s in range(0, cfg.runs, cfg.batch_size):
                        sl = slice(s, s + cfg.batch_size)
                        x_t = ctx.add_noise(x0[sl], noise[sl], torch.full((len(x0[sl]),), t)).to(ctx.device)
                        tt = torch.full((len(x_t),), t, device=ctx.device)
                        ctx.predict(ctx.unet, x_t, tt, emb[sl].to(ctx.device))
                        if empty is not None:
                            ctx.predict(ctx.unet, x_t, tt, empty.expand(len(x_t), -1, -1).to(ctx.device))
                        for n, v in hooks.take().items():
                            chunks.setdefault(n, []).append(v)
                    for n, v in chunks.items():
                        per_step.setdefault(n, []).append(torch.cat(v))
                out[kind] = {n: torch.stack(v) for n, v in per_step.items()}
        finally:
            hooks.remove()
        return out

    @staticmethod
    def contrast(norms: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Eq. 2 without |W|: max(0, mu_c - mu_b - sigma_b), [T, C_in] per layer."""
        out = {}
        for n in norms["concept"]:
            c, b = norms["concept"][n], norms["base"][n]
            out[n] = (c.mean(1) - b.mean(1) - b.std(1, correction=0)).clamp(min=0)
        return out

    # -- (2) concept-sensitive neurons -------------------------------------------------------------------

    def sensitive(self, abs_w: torch.Tensor, contrast: torch.Tensor, r2: float) -> torch.Tensor:
        """Q [C_out, C_in] bool for one layer: Eq. 3 then the channel- and layer-level top-k (Eq. 4-6)."""
        cfg = self.config
        steps = len(contrast)
        avg = abs_w * contrast.mean(0)  # mean_t S, S_t = |W| * contrast_t
        freq = torch.zeros_like(abs_w)
        k1 = max(1, int(cfg.r1 * abs_w.numel()))
        for c_t in contrast:
            s = abs_w * c_t
            tau = s.flatten().topk(k1).values[-1]
            freq += (s > tau).float()
        a = 0.5 * avg / avg.max().clamp(min=1e-12) + 0.5 * freq / steps
        c_in = a.shape[1]
        channel = torch.zeros_like(a, dtype=torch.bool)
        channel.scatter_(1, a.topk(max(1, int(r2 * c_in)), dim=1).indices, True)
        layer = torch.zeros(a.numel(), dtype=torch.bool)
        layer[a.flatten().topk(max(1, int(r2 * a.numel()))).indices] = True
        return channel & layer.view_as(a) & (a > 0)

    # -- (3) fusion -----------------------------------------------------------------------------------------

    def fuse(self, masks: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], int]:
        """prune = 0 < s < tau_ca with s the number of concepts that selected a weight."""
        tau_ca = max(2, math.ceil(self.config.alpha * len(masks)))
        prune = {}
        for n in masks[0]:
            s = torch.stack([m[n] for m in masks]).sum(0)
            prune[n] = (s > 0) & (s < tau_ca)
        return prune, tau_ca

    def fit_stage(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.config
        weights = self.trainable_parameters(ctx.unet)
        masks = []
        for d in ctx.concepts:
            contrast = self.contrast(self.column_norms(ctx, d))
            r2 = cfg.r2_overrides.get(d.name, cfg.r2)
            masks.append({f"{n}.weight": self.sensitive(weights[f"{n}.weight"].detach().abs().float().cpu(), c, r2)
                          for n, c in contrast.items()})
        prune, tau_ca = self.fuse(masks)
        with torch.no_grad():
            for n, p in weights.items():
                p.mul_((~prune[n]).to(p.device, p.dtype))
        self.last_prune = prune  # for inspection (tests); not state: the zeros themselves carry over
        pruned = sum(int(m.sum()) for m in prune.values())
        total = sum(p.numel() for p in weights.values())
        summary = {"pruned": pruned, "pruned_ratio": round(pruned / total, 6), "tau_ca": tau_ca,
                   "selected": [sum(int(m.sum()) for m in q.values()) for q in masks]}
        ctx.log({"step": 0, **summary})
        return summary
