"""Forget-Me-Not, FMN (Zhang et al., 2023), attention re-steering: on images of the concept under
its own prompt, minimise the cross-attention the image pays to the concept's tokens:

    L_fmn = || concat over attn2 layers l of  A_l[:, :, concept tokens] ||_2,
    A_l = softmax(Q_l K_l^T / sqrt(d)),   x_t = noised concept image,   prompt = the concept's

No denoising term: once no pixel attends to the words, the prompt stops drawing the concept.
The concept tokens are the concept's words (name and synonyms) located with the pipeline's
tokenizer, plus the end-of-text token (`use_pooler`, as in the authors' configuration).

Defaults: the authors' configuration (configs/attn.yaml: 35 steps, lr 2e-6 constant, batch 1, the
whole UNet trained, gradient norm clipped at 1.0). Remaining differences from the authors' code:
- the paper first learns a textual-inversion token for the concept from its images (`use_ti: true`)
  and steers the attention of that token; here the concept's own words are used (the images are the
  model's own drawings of them);
- only the end-of-text token that closes the prompt is steered: the authors mark every token with
  that id, which on their SD 2.x is the same thing, but SD 1.x pads with it;
- Adam without weight decay (the authors: AdamW, 0.01);
All of the stage's concepts are trained together, as the authors' multi-concept runs do.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from sculpt.data.prepare import encode_prompts
from sculpt.methods.base import ErasureMethod, MethodConfig, register
from sculpt.models.cross_attention import AttentionRecorder, word_token_mask
from sculpt.models.loading import cross_attention_params
from sculpt.stage import StageContext, check_finite


class FMNConfig(MethodConfig):
    steps: int = Field(35, ge=1)
    lr: float = Field(2e-6, gt=0, description="Adam, constant")
    batch_size: int = Field(1, ge=1)
    train: Literal["unet", "cross_attention"] = Field("unet", description="authors: the whole UNet")
    use_pooler: bool = Field(True, description="also steer the end-of-text token's attention")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm (the authors: 1.0); null: no clipping")
    prompt_template: str = Field("a photo of {}", description="the authors' template for objects")


def concept_token_batch(ctx: StageContext, template: str, use_pooler: bool) -> list[dict[str, torch.Tensor]]:
    """Per stage concept: its prompts' embeddings [P, L, D] and concept-token masks [P, L]."""
    out = []
    for d in ctx.concepts:
        prompts = d.concept.concept_prompts(template)
        words = d.concept.words
        out.append({
            "embeds": encode_prompts(ctx.pipe, prompts).to(ctx.device),
            "mask": word_token_mask(ctx.pipe.tokenizer, prompts, words, end_token=use_pooler).to(ctx.device),
        })
    return out


@register
class ForgetMeNot(ErasureMethod):
    """Forget-Me-Not: minimise the cross-attention on the concept's tokens (Zhang et al. 2023)."""

    name = "fmn"
    config_class = FMNConfig

    def trainable_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        if self.config.train == "cross_attention":
            return cross_attention_params(unet)
        return dict(unet.named_parameters())

    def steps_per_stage(self) -> int:
        return self.config.steps

    def fit_stage(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.config
        prompts = concept_token_batch(ctx, cfg.prompt_template, cfg.use_pooler)
        params = self.trainable_parameters(ctx.unet)
        model, optimizer, _ = ctx.prepare_training(params, cfg.lr, cfg.steps, schedule="constant")
        first = last = None
        with AttentionRecorder(ctx.unet) as rec:
            for step in range(cfg.steps):
                x, emb, mask = [], [], []
                for _ in range(cfg.batch_size):  # a concept, one of its images, one of its prompts
                    k = int(torch.randint(len(ctx.concepts), (1,), generator=ctx.generator))
                    i = int(torch.randint(len(ctx.concepts[k].latents), (1,), generator=ctx.generator))
                    j = int(torch.randint(len(prompts[k]["embeds"]), (1,), generator=ctx.generator))
                    x.append(ctx.concepts[k].latents[i : i + 1])
                    emb.append(prompts[k]["embeds"][j : j + 1])
                    mask.append(prompts[k]["mask"][j : j + 1])
                x_0 = torch.cat(x).to(ctx.device)
                t = ctx.timesteps(len(x_0))
                x_t = ctx.add_noise(x_0, ctx.noise_like(x_0), t)
                rec.clear()
                rec.token_mask = torch.cat(mask)
                ctx.predict(model, x_t, t, torch.cat(emb))
                # || A on the concept tokens ||_2 over all layers (the maps are zero elsewhere)
                loss = torch.cat([m.flatten() for m in rec.maps]).norm()
                check_finite(L_fmn=loss)
                ctx.accelerator.backward(loss)
                if cfg.max_grad_norm is not None:
                    ctx.accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                mass = rec.mass().mean().item()
                first = mass if first is None else first
                last = mass
                ctx.log({"step": step, "loss": round(loss.item(), 6), "attention_mass": round(mass, 6)})
            rec.clear()
        ctx.finish_training()
        ctx.accelerator.free_memory()  # accelerate keeps every prepared optimizer (its Adam state) otherwise
        return {"attention_mass_first": first, "attention_mass_last": last}
