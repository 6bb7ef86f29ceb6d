"""UCE, Unified Concept Editing (Gandikota et al., WACV 2024): a closed-form edit of every
cross-attention key and value projection, all of the stage's concepts at once, no training.

For each W0 in {attn2.to_k, attn2.to_v}:

    W = ( lam W0 + sum_e (W0 c_guide) c_e^T + sum_p (W0 c_p) c_p^T ) ( lam I + sum_e c_e c_e^T + sum_p c_p c_p^T )^-1

c_e: token embeddings of an erased concept's prompts, c_guide: the embeddings at the same places
of the guide prompt (the superclass, or the empty prompt), c_p: preserved prompts' embeddings
(kept where they are). So the text "a photo of a tench" reads, to the UNet, like "a photo of a fish".

Which tokens: as in the authors' code, from the prompt's last word token to the end (the word and
the end-of-text/padding tokens that follow it), aligned at the tail with the guide prompt's; the
tokens before the word are left alone (a causal text encoder such as CLIP's does not let the
concept reach them). Prompts: the concept's prompts and synonyms in `prompt_template`.

Preserved (as the authors' code): every token of each preserved prompt (the superclasses, `preserve`)
and every token of the empty prompt '', which classifier-free guidance reads at every step. (Until
issue 12 only the superclass prompt from its last word on was kept; after ten edits the empty
prompt's keys and values had moved 57%.) `preserve_tokens: tail` and `preserve_empty: false` give
that older behaviour back.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from sculpt.data.prepare import encode_token_states
from sculpt.methods.base import ErasureMethod, MethodConfig, register
from sculpt.models.cross_attention import key_value_params, last_word_position
from sculpt.stage import StageContext

@torch.no_grad()
def closed_form_edit(w0: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, lam: float,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """The ridge least-squares edit of a linear map:

        W = argmin_W  lam ||W - W0||_F^2 + sum_i s_i ||W x_i - y_i||^2
          = (lam W0 + sum_i s_i y_i x_i^T) (lam I + sum_i s_i x_i x_i^T)^-1

    inputs x_i: [n, D] rows, targets y_i: [n, out] rows, weights s_i: [n] (default 1). Solved in
    float64 (the normal matrix of many token embeddings is badly conditioned in float32)."""
    w0_ = w0.double()
    x, y = inputs.double().to(w0.device), targets.double().to(w0.device)
    s = torch.ones(len(x), dtype=torch.float64, device=w0.device) if weights is None else weights.double().to(w0.device)
    lhs = lam * torch.eye(x.shape[1], dtype=torch.float64, device=w0.device) + x.T @ (x * s[:, None])
    rhs = lam * w0_ + (y * s[:, None]).T @ x
    return torch.linalg.solve(lhs, rhs.T).T.to(w0.dtype)  # lhs is symmetric: W = rhs lhs^-1


def tail_aligned_tokens(pipe, prompts: list[str], guides: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (c_e, c_guide) of token embeddings: each prompt's tokens from its last word to the
    end, next to its guide prompt's from the guide's last word, as many as both have."""
    embeds = encode_token_states(pipe, prompts).to(device)
    guide_embeds = encode_token_states(pipe, guides).to(device)
    ie = last_word_position(pipe.tokenizer, prompts).tolist()
    ig = last_word_position(pipe.tokenizer, guides).tolist()
    length = embeds.shape[1]
    erase, guide = [], []
    for k in range(len(prompts)):
        n = length - max(ie[k], ig[k])
        erase.append(embeds[k, ie[k] : ie[k] + n])
        guide.append(guide_embeds[k, ig[k] : ig[k] + n])
    return torch.cat(erase), torch.cat(guide)


class UCEConfig(MethodConfig):
    """Defaults: the authors' (lambda 0.5, erase and preserve scales 1)."""

    lam: float = Field(0.5, gt=0, description="lambda: pull toward the current weights")
    guide: Literal["superclass", "empty"] = Field("superclass", description="what an erased concept becomes")
    preserve: list[str] = Field(default_factory=list, description="extra concepts to keep (words, put in the template)")
    preserve_superclasses: bool = Field(True, description="also keep each concept's superclass")
    preserve_empty: bool = Field(True, description="also keep the empty prompt '' (the authors always do)")
    preserve_tokens: Literal["all", "tail"] = Field(
        "all", description="which tokens of a preserved prompt are kept: all (the authors') or from its last word on")
    erase_scale: float = Field(1.0, gt=0)
    preserve_scale: float = Field(1.0, ge=0)
    prompt_template: str = Field("a photo of a {}", description="should match data.prompt_template")


@register
class UCE(ErasureMethod):
    """UCE: closed-form edit of cross-attention keys/values, concepts -> guides (Gandikota et al. 2024)."""

    name = "uce"
    config_class = UCEConfig

    def trainable_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        return key_value_params(unet)

    def edit_pairs(self, ctx: StageContext) -> dict[str, torch.Tensor]:
        """c_e, c_guide (erased) and c_p (preserved) token embeddings for the stage's concepts."""
        cfg = self.config
        prompts, guides = [], []
        for d in ctx.concepts:
            for p in d.concept.concept_prompts(cfg.prompt_template):
                prompts.append(p)
                guides.append(cfg.prompt_template.format(d.concept.superclass) if cfg.guide == "superclass" else "")
        c_e, c_g = tail_aligned_tokens(ctx.pipe, prompts, guides, ctx.device)
        kept = list(cfg.preserve) + ([d.concept.superclass for d in ctx.concepts] if cfg.preserve_superclasses else [])
        kept = [cfg.prompt_template.format(w) for w in dict.fromkeys(kept)] + ([""] if cfg.preserve_empty else [])
        if not kept:
            c_p = c_e.new_zeros(0, c_e.shape[1])
        elif cfg.preserve_tokens == "all":
            c_p = encode_token_states(ctx.pipe, kept).to(ctx.device).flatten(0, 1)  # every token of every kept prompt
        else:
            c_p, _ = tail_aligned_tokens(ctx.pipe, kept, kept, ctx.device)
        return {"c_e": c_e, "c_guide": c_g, "c_p": c_p}

    def fit_stage(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.config
        pairs = self.edit_pairs(ctx)
        c_e, c_g, c_p = pairs["c_e"], pairs["c_guide"], pairs["c_p"]
        inputs = torch.cat([c_e, c_p])
        scales = torch.cat([torch.full((len(c_e),), cfg.erase_scale), torch.full((len(c_p),), cfg.preserve_scale)])
        with torch.no_grad():
            for n, w in self.trainable_parameters(ctx.unet).items():
                w0 = w.detach().float()
                targets = torch.cat([c_g @ w0.T, c_p @ w0.T])  # W0 c_guide, W0 c_p
                w.copy_(closed_form_edit(w0, inputs, targets, cfg.lam, scales))
        ctx.log({"step": 0, "erased_tokens": len(c_e), "preserved_tokens": len(c_p)})
        return {"erased_tokens": len(c_e), "preserved_tokens": len(c_p)}
