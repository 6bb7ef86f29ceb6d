"""MACE, Mass Concept Erasure (Lu et al., CVPR 2024): three steps per stage, every concept at once.

(a) Closed-form refinement of every attn2 key/value projection (UCE's edit, `uce.closed_form_edit`):
    the concept's words *and the words that follow them* (which absorb the concept through the text
    encoder) are mapped onto the anchor prompt's:

        W1 = argmin lam ||W - W0||^2 + sum_e ||W c_e - W0 c_anchor||^2 + s_p sum_p ||W c_p - W0 c_p||^2

(b) One rank-r LoRA per concept on the same projections (W1 + B_i A_i), trained on the concept's
    images under its prompts to take the attention away from the concept's tokens where the
    concept is:

        L_i = mean over attn2 layers l of || A_l[:, :, concept tokens] * M_l ||^2

    MACE takes M from a segmentation model (Grounded-SAM) on the image. Here M is the cross-attention
    map itself: the stage-start model's attention on the concept tokens at that layer, averaged over
    heads and tokens, kept where it is at least `mask_threshold` times its maximum (no segmentation
    model is available offline, and the attention map marks the same region by construction).

(c) Closed-form fusion of the LoRAs into one weight, so the result is plain weights:

        W* = argmin lam ||W - W1||^2 + sum_i sum_{x in E_i} ||W x - (W1 + B_i A_i) x||^2 + s_f sum_p ||W c_p - W1 c_p||^2

    E_i: every token embedding of concept i's prompts.

Defaults: the authors' object configuration (lam 1e3, rank 1, 50 steps per LoRA at lr 1e-5
constant, batch 1, preservation scales 0, end-of-text token included). Not done: the
concept-focal importance sampling of timesteps (t is uniform here) and the augmented prompts of
the authors' data generation (the concept's prompts and synonyms are used).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from sculpt.methods.base import ErasureMethod, MethodConfig, register
from sculpt.methods.fmn import concept_token_batch
from sculpt.methods.uce import closed_form_edit, tail_aligned_tokens
from sculpt.models.cross_attention import AttentionRecorder, key_value_params
from sculpt.stage import StageContext, check_finite


class MACEConfig(MethodConfig):
    lam: float = Field(1e3, gt=0, description="ridge toward the current weights in (a) and (c)")
    preserve: list[str] = Field(default_factory=list, description="concepts to keep (words, put in the template)")
    preserve_superclasses: bool = Field(True, description="add each concept's superclass to `preserve`")
    train_preserve_scale: float = Field(0.0, ge=0, description="s_p: preservation weight in (a)")
    fuse_preserve_scale: float = Field(0.0, ge=0, description="s_f: preservation weight in (c)")
    lora_rank: int = Field(1, ge=1)
    lora_steps: int = Field(50, ge=1, description="per concept")
    lora_lr: float = Field(1e-5, gt=0, description="Adam, constant")
    batch_size: int = Field(1, ge=1)
    mask_threshold: float = Field(0.5, ge=0, le=1, description="M: attention >= this share of its maximum")
    use_pooler: bool = Field(True, description="the end-of-text token counts as a concept token")
    prompt_template: str = Field("a photo of a {}", description="should match data.prompt_template")


class _LoRA(nn.Module):
    """W -> W + B A (rank r), as a parametrisation of a frozen projection's weight."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator):
        super().__init__()
        out_dim, in_dim = weight.shape
        bound = 1.0 / math.sqrt(in_dim)
        down = (torch.rand(rank, in_dim, generator=generator) * 2 - 1) * bound
        self.down = nn.Parameter(down.to(weight.device, weight.dtype))  # A: random
        self.up = nn.Parameter(torch.zeros(out_dim, rank, device=weight.device, dtype=weight.dtype))  # B: 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.up @ self.down


@register
class MACE(ErasureMethod):
    """MACE: closed-form refinement + one attention-suppressing LoRA per concept, fused in closed form (Lu et al. 2024)."""

    name = "mace"
    config_class = MACEConfig

    def trainable_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        return key_value_params(unet)

    def steps_per_stage(self) -> int:
        return self.config.lora_steps

    # -- inputs ------------------------------------------------------------------------------------

    def _preserved(self, ctx: StageContext) -> torch.Tensor:
        cfg = self.config
        words = list(cfg.preserve) + ([d.concept.superclass for d in ctx.concepts] if cfg.preserve_superclasses else [])
        prompts = [cfg.prompt_template.format(w) for w in dict.fromkeys(words)]
        if not prompts:
            return torch.zeros(0, ctx.unet.config.cross_attention_dim, device=ctx.device)
        return tail_aligned_tokens(ctx.pipe, prompts, prompts, ctx.device)[0]

    @torch.no_grad()
    def draw_batches(self, ctx: StageContext, k: int, tokens: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """The LoRA's training batches for concept k, each with its region masks M_l, computed on
        the stage-start model: where that model's attention on the concept tokens is high."""
        cfg = self.config
        d = ctx.concepts[k]
        batches = []
        with AttentionRecorder(ctx.unet) as rec:
            for _ in range(cfg.lora_steps):
                i = torch.randint(len(d.latents), (cfg.batch_size,), generator=ctx.generator)
                j = torch.randint(len(tokens["embeds"]), (cfg.batch_size,), generator=ctx.generator)
                x_0 = d.latents[i].to(ctx.device)
                t = ctx.timesteps(len(x_0))
                x_t = ctx.add_noise(x_0, ctx.noise_like(x_0), t)
                rec.clear()
                rec.token_mask = tokens["mask"][j]
                ctx.predict(ctx.unet, x_t, t, tokens["embeds"][j])
                regions = []
                for m in rec.maps:
                    heat = m.sum(-1).mean(1)  # [B, pixels]
                    regions.append(heat >= cfg.mask_threshold * heat.amax(-1, keepdim=True))
                batches.append({"x_t": x_t, "t": t, "prompt": j, "regions": regions})
        return batches

    # -- (a), (b), (c) -------------------------------------------------------------------------------

    @torch.no_grad()
    def refine(self, ctx: StageContext, kv: dict[str, nn.Parameter], c_p: torch.Tensor) -> int:
        """(a) W1 = closed-form map of the concepts' tokens onto the anchors' tokens."""
        cfg = self.config
        prompts, anchors = [], []
        for d in ctx.concepts:
            for p in d.concept.concept_prompts(cfg.prompt_template):
                prompts.append(p)
                anchors.append(cfg.prompt_template.format(d.concept.superclass))
        c_e, c_a = tail_aligned_tokens(ctx.pipe, prompts, anchors, ctx.device)
        inputs = torch.cat([c_e, c_p])
        scales = torch.cat([torch.ones(len(c_e)), torch.full((len(c_p),), cfg.train_preserve_scale)])
        for w in kv.values():
            w0 = w.detach().float()
            w.copy_(closed_form_edit(w0, inputs, torch.cat([c_a @ w0.T, c_p @ w0.T]), cfg.lam, scales))
        return len(c_e)

    def train_lora(self, ctx: StageContext, kv: dict[str, nn.Parameter], batches: list[dict[str, Any]],
                   tokens: dict[str, torch.Tensor], concept: str) -> dict[str, torch.Tensor]:
        """(b) One LoRA against the concept's attention inside its regions; returns its B A per weight."""
        cfg = self.config
        modules = dict(ctx.unet.named_modules())
        loras = {}
        for n in kv:
            lora = _LoRA(kv[n], cfg.lora_rank, ctx.generator)
            parametrize.register_parametrization(modules[n.removesuffix(".weight")], "weight", lora)
            loras[n] = lora
        params = {f"{n}.{p}": getattr(lora, p) for n, lora in loras.items() for p in ("down", "up")}
        try:
            model, optimizer, _ = ctx.prepare_training(params, cfg.lora_lr, len(batches), schedule="constant")
            with AttentionRecorder(ctx.unet) as rec:
                for step, b in enumerate(batches):
                    rec.clear()
                    rec.token_mask = tokens["mask"][b["prompt"]]
                    ctx.predict(model, b["x_t"], b["t"], tokens["embeds"][b["prompt"]])
                    # mean_l || A_l[:, :, concept tokens] * M_l ||^2   (per image and head)
                    loss = torch.stack([
                        (m * r[:, None, :, None]).pow(2).sum(dim=(2, 3)).mean() for m, r in zip(rec.maps, b["regions"])
                    ]).mean()
                    check_finite(L_attn=loss)
                    ctx.accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    ctx.log({"step": step, "concept": concept, "loss": round(loss.item(), 8)})
                rec.clear()
            return {n: (lora.up @ lora.down).detach().clone() for n, lora in loras.items()}
        finally:
            for n in loras:  # back to the plain weight W1 (the LoRA is kept only as B A)
                parametrize.remove_parametrizations(modules[n.removesuffix(".weight")], "weight",
                                                    leave_parametrized=False)
            ctx.finish_training()
            ctx.accelerator.free_memory()  # accelerate keeps every prepared optimizer (its Adam state) otherwise

    @torch.no_grad()
    def fuse(self, ctx: StageContext, kv: dict[str, nn.Parameter], deltas: list[dict[str, torch.Tensor]],
             tokens: list[dict[str, torch.Tensor]], c_p: torch.Tensor) -> None:
        """(c) W* = the one weight closest to every W1 + B_i A_i on concept i's token embeddings."""
        cfg = self.config
        for n, w in kv.items():
            w1 = w.detach().float()
            inputs, targets = [], []
            for delta, tok in zip(deltas, tokens):
                x = tok["embeds"].flatten(0, 1)
                inputs.append(x)
                targets.append(x @ (w1 + delta[n].float()).T)
            inputs.append(c_p)
            targets.append(c_p @ w1.T)
            scales = torch.cat([torch.ones(sum(len(x) for x in inputs[:-1])), torch.full((len(c_p),), cfg.fuse_preserve_scale)])
            w.copy_(closed_form_edit(w1, torch.cat(inputs), torch.cat(targets), cfg.lam, scales))

    def fit_stage(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.config
        kv = self.trainable_parameters(ctx.unet)
        tokens = concept_token_batch(ctx, cfg.prompt_template, cfg.use_pooler)
        batches = [self.draw_batches(ctx, k, tokens[k]) for k in range(len(ctx.concepts))]  # masks: stage start
        c_p = self._preserved(ctx)
        erased = self.refine(ctx, kv, c_p)
        deltas = [self.train_lora(ctx, kv, batches[k], tokens[k], d.name) for k, d in enumerate(ctx.concepts)]
        self.fuse(ctx, kv, deltas, tokens, c_p)
        return {"refined_tokens": erased, "loras": len(deltas)}
