"""MACE, Mass Concept Erasure (Lu et al., CVPR 2024): three steps per stage, every concept at once.

(a) Closed-form refinement of every attn2 key/value projection: the words that co-exist with the
    concept in its prompts (which absorb the concept through the text encoder) are mapped onto the
    same words of the anchor prompt (the concept replaced by its superclass):

        W1 = argmin lam' ||W - W0||^2 + sum_e ||W c_e - W0 c_anchor||^2 + s_p sum_p ||W c_p - W0 c_p||^2

    Which tokens (the authors' `find_matching_indices`): the positions the concept's prompt and the
    anchor prompt share, i.e. their common first tokens, their common last tokens and every padding
    position after the prompt, paired in order; the differing middle (the concept's own word tokens)
    is left out, as (b) takes care of it. (`refine_tokens: tail` gives the older rule, UCE's: from the
    prompt's last word on.)

(b) One rank-r LoRA per concept on the same projections (W1 + B_i A_i), trained on the concept's
    images under its prompts to take the attention away from the concept's tokens where the
    concept is (the authors' `AttnController.loss`):

        L_i = sum over attn2 layers l of || A_l[:, :, concept tokens] * M_l ||_F      (not squared)

    Concept tokens: the concept's word tokens as found in the prompt, and, with `use_pooler`, the
    end-of-text token and every padding token after it (SD's CLIP pads with the end-of-text id and
    the authors mark every token with that id). A starts as normal(0, (1/rank)^2), B as 0 (diffusers'
    `LoRALinearLayer`, which the authors use); gradients are clipped to norm 1.0.

    MACE takes M from a segmentation model (Grounded-SAM) on the image. Here M is the cross-attention
    map itself: the stage-start model's attention on the concept tokens at that layer, averaged over
    heads and tokens, kept where it is at least `mask_threshold` times its maximum (no segmentation
    model is available offline, and the attention map marks the same region by construction).

(c) Closed-form fusion of the LoRAs into one weight, so the result is plain weights:

        W* = argmin lam' ||W - W1||^2 + sum_i sum_{x in E_i} ||W x - (W1 + B_i A_i) x||^2 + s_f sum_p ||W c_p - W1 c_p||^2

    E_i: every token embedding (all positions) of concept i's prompts.

The ridge lam' (`ridge`). The authors' lam (1e3 in their ship config, 1e2 automobile, 1e1 bird) is
weighed against sums over 30 augmented prompts x 77 token positions per concept; here the sums run
over a few prompts x 16 positions, so the same lam weighs ~100x more against the data. The rule: the
ridge per summed token position is the authors',

    lam' = lam * (token positions summed here) / (concepts * lam_positions),   lam_positions = 30 * 77.

Measured (closed form only, random rank-1 LoRA for (c)): on text states of unit variance per
dimension (tests: tiny pipeline, 256 wide, one concept) (a) reaches 99% of the intended key/value
change and (c) keeps 96% of the LoRA's effect, against 55% and 13% at lam 1e3 as is. On the emoji
world (poodle -> dog, one prompt: 14 positions, lam' = 6) 84% and 88%, against 28% and 8% at lam
1e3 as is and 91% and 96% at lam' = 1: its text states are smaller (mean squared norm 87 over 384
dimensions), so the per-position ridge still weighs more there; lam is in the protocol's grid.
`lam_positions: null` uses lam as is.

Defaults: the authors' object configuration (lam 1e3, rank 1, 50 steps per LoRA at lr 1e-5
constant, batch 1, preservation scales 0, end-of-text and padding tokens included, gradient norm
clipped at 1.0). Remaining differences from the authors' code:
- M: the attention map (above) instead of Grounded-SAM masks;
- t drawn uniformly from the noise schedule; the authors use their concept-focal importance sampling
  (t concentrated on 200..400 of 1000);
- prompts: the concept's prompts and synonyms in `prompt_template` (a few), not the 30 augmented
  prompts of the authors' templates; the anchor is the concept's superclass (the authors map objects
  to a `mapping_concept` of the user's choice);
- Adam without weight decay (the authors: AdamW, weight decay 0.01);
- the LoRA sits on the key and value projections only (the authors also attach untrained, hence
  zero, LoRAs to the query, output and self-attention projections: no effect);
- the masks M are computed once, on the stage-start model, for the steps' pre-drawn batches;
- with a preservation scale above 0 (off by default, as in the authors' configs), the preserved
  prompts (`preserve` and the superclasses) contribute their tokens from the last word on; the
  authors' preservation caches every token of their COCO captions.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from sculpt.data.prepare import encode_prompts, encode_token_states
from sculpt.methods.base import ErasureMethod, MethodConfig, register
from sculpt.methods.uce import closed_form_edit, tail_aligned_tokens
from sculpt.models.cross_attention import AttentionRecorder, key_value_params, word_token_mask
from sculpt.stage import StageContext, check_finite

# Token positions the authors' closed-form sums run over per concept: 30 augmented prompts x CLIP's
# 77 positions (`aug_length: 30` in every configuration of theirs).
AUTHORS_POSITIONS = 30 * 77


class MACEConfig(MethodConfig):
    lam: float = Field(1e3, gt=0, description="the authors' ridge toward the current weights in (a) and (c), "
                       "for lam_positions summed token positions per concept")
    lam_positions: int | None = Field(
        AUTHORS_POSITIONS, ge=1, description="positions per concept lam was set for (30 prompts x 77); the ridge "
        "used is lam x positions summed here / (concepts x this); null: lam as is")
    preserve: list[str] = Field(default_factory=list, description="concepts to keep (words, put in the template)")
    preserve_superclasses: bool = Field(True, description="add each concept's superclass to `preserve`")
    train_preserve_scale: float = Field(0.0, ge=0, description="s_p: preservation weight in (a)")
    fuse_preserve_scale: float = Field(0.0, ge=0, description="s_f: preservation weight in (c)")
    refine_tokens: Literal["shared", "tail"] = Field(
        "shared", description="(a)'s tokens: those the prompt shares with its anchor (the authors'), or UCE's "
        "from the last word on")
    lora_rank: int = Field(1, ge=1)
    lora_init: Literal["normal", "uniform"] = Field(
        "normal", description="A at the start: normal(std 1/rank) as diffusers' LoRALinearLayer (the authors'), "
        "or uniform +-1/sqrt(in_features)")
    lora_steps: int = Field(50, ge=1, description="per concept")
    lora_lr: float = Field(1e-5, gt=0, description="Adam, constant")
    batch_size: int = Field(1, ge=1)
    loss: Literal["norm", "squared"] = Field(
        "norm", description="(b): sum over layers of the masked maps' norms (the authors'), or the mean of their "
        "squares")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the LoRA's gradient norm (the authors: 1.0); "
                                        "null: no clipping")
    mask_threshold: float = Field(0.5, ge=0, le=1, description="M: attention >= this share of its maximum")
    use_pooler: bool = Field(True, description="the end-of-text token counts as a concept token")
    end_tokens: Literal["all", "first"] = Field(
        "all", description="with use_pooler: the end-of-text token and all padding after it (the authors'), "
        "or only the end-of-text token")
    prompt_template: str = Field("a photo of a {}", description="should match data.prompt_template")


# -- which tokens ----------------------------------------------------------------------------------------


def shared_positions(ids: list[int], anchor_ids: list[int], length: int) -> tuple[list[int], list[int]]:
    """The positions a prompt shares with its anchor prompt, paired (MACE's `find_matching_indices`
    rule, with the padding that follows): the common first tokens, the common last tokens (at least
    the end-of-text token), then `length - max(len)` padding positions after each prompt. `ids`,
    `anchor_ids`: unpadded token ids. The differing middle (the concept's and the anchor's words) is
    left out of both."""
    n = min(len(ids), len(anchor_ids))
    head = 0
    while head < n and ids[head] == anchor_ids[head]:
        head += 1
    tail = 0
    while tail < n - head and ids[-1 - tail] == anchor_ids[-1 - tail]:
        tail += 1
    pad = length - max(len(ids), len(anchor_ids))
    return ([*range(head), *range(len(ids) - tail, len(ids) + pad)],
            [*range(head), *range(len(anchor_ids) - tail, len(anchor_ids) + pad)])


def shared_tokens(pipe, prompts: list[str], anchors: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (c_e, c_anchor) of token embeddings at the positions each prompt shares with its anchor."""
    tokenizer = pipe.tokenizer
    length = tokenizer.model_max_length
    embeds = encode_token_states(pipe, prompts).to(device)
    anchor_embeds = encode_token_states(pipe, anchors).to(device)
    ids = tokenizer(prompts, truncation=True, max_length=length).input_ids
    anchor_ids = tokenizer(anchors, truncation=True, max_length=length).input_ids
    erase, anchor = [], []
    for k in range(len(prompts)):
        pe, pa = shared_positions(ids[k], anchor_ids[k], length)
        erase.append(embeds[k, pe])
        anchor.append(anchor_embeds[k, pa])
    return torch.cat(erase), torch.cat(anchor)


def steered_token_mask(tokenizer, prompts: list[str], words: list[str], use_pooler: bool,
                       end_tokens: str) -> torch.Tensor:
    """[P, L] bool: the tokens (b) steers attention away from: the concept's word tokens as found in
    each prompt and, with use_pooler, the end-of-text token and (end_tokens "all") every padding
    position after it."""
    mask = word_token_mask(tokenizer, prompts, words, end_token=use_pooler and end_tokens == "first")
    if use_pooler and end_tokens == "all":
        attention = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").attention_mask
        end = attention.sum(-1, keepdim=True) - 1  # position of the end-of-text token
        mask |= torch.arange(attention.shape[1])[None, :] >= end
    return mask


# -- the LoRA and its loss ------------------------------------------------------------------------------


class _LoRA(nn.Module):
    """W -> W + B A (rank r), as a parametrisation of a frozen projection's weight."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator, init: str):
        super().__init__()
        out_dim, in_dim = weight.shape
        if init == "normal":  # diffusers' LoRALinearLayer: A ~ N(0, (1/rank)^2)
            down = torch.randn(rank, in_dim, generator=generator) / rank
        else:  # torch's nn.Linear default: U(-1/sqrt(in), 1/sqrt(in))
            down = (torch.rand(rank, in_dim, generator=generator) * 2 - 1) / math.sqrt(in_dim)
        self.down = nn.Parameter(down.to(weight.device, weight.dtype))  # A: random
        self.up = nn.Parameter(torch.zeros(out_dim, rank, device=weight.device, dtype=weight.dtype))  # B: 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.up @ self.down


def attention_loss(maps: list[torch.Tensor], regions: list[torch.Tensor], kind: str) -> torch.Tensor:
    """(b)'s loss from the recorded maps ([B, heads, pixels, L], zero off the concept tokens) and the
    region masks ([B, pixels]):

        norm:    sum_l || A_l * M_l ||_F                                   (the authors')
        squared: mean_l mean_b sum_heads || A_l * M_l ||^2   (before issue 12)

    The norm's gradient keeps its size as the attention shrinks; the square's fades with it."""
    masked = [m * r[:, None, :, None].to(m.dtype) for m, r in zip(maps, regions)]
    if kind == "norm":
        return torch.stack([torch.linalg.vector_norm(a) for a in masked]).sum()
    return torch.stack([a.pow(2).sum(dim=(2, 3)).mean() for a in masked]).mean()


@register
class MACE(ErasureMethod):
    """MACE: closed-form refinement + one attention-suppressing LoRA per concept, fused in closed form (Lu et al. 2024)."""

    name = "mace"
    config_class = MACEConfig

    def trainable_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        return key_value_params(unet)

    def steps_per_stage(self) -> int:
        return self.config.lora_steps

    def ridge(self, positions: int, concepts: int) -> float:
        """lam' = lam * positions / (concepts * lam_positions): the authors' ridge per summed token
        position, for a sum over `positions` token positions of `concepts` concepts."""
        cfg = self.config
        if cfg.lam_positions is None:
            return cfg.lam
        return cfg.lam * positions / (max(concepts, 1) * cfg.lam_positions)

    # -- inputs ------------------------------------------------------------------------------------

    def _preserved(self, ctx: StageContext) -> torch.Tensor:
        cfg = self.config
        words = list(cfg.preserve) + ([d.concept.superclass for d in ctx.concepts] if cfg.preserve_superclasses else [])
        prompts = [cfg.prompt_template.format(w) for w in dict.fromkeys(words)]
        if not prompts:
            return torch.zeros(0, ctx.unet.config.cross_attention_dim, device=ctx.device)
        return tail_aligned_tokens(ctx.pipe, prompts, prompts, ctx.device)[0]

    def token_batch(self, ctx: StageContext) -> list[dict[str, torch.Tensor]]:
        """Per stage concept: its prompts' embeddings [P, L, D] and steered-token masks [P, L]."""
        cfg = self.config
        out = []
        for d in ctx.concepts:
            prompts = d.concept.concept_prompts(cfg.prompt_template)
            mask = steered_token_mask(ctx.pipe.tokenizer, prompts, d.concept.words, cfg.use_pooler, cfg.end_tokens)
            out.append({"embeds": encode_prompts(ctx.pipe, prompts).to(ctx.device), "mask": mask.to(ctx.device)})
        return out

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
        """(a) W1 = closed-form map of the concepts' co-existing tokens onto the anchors' tokens."""
        cfg = self.config
        prompts, anchors = [], []
        for d in ctx.concepts:
            for p in d.concept.concept_prompts(cfg.prompt_template):
                prompts.append(p)
                anchors.append(cfg.prompt_template.format(d.concept.superclass))
        pairs = shared_tokens if cfg.refine_tokens == "shared" else tail_aligned_tokens
        c_e, c_a = pairs(ctx.pipe, prompts, anchors, ctx.device)
        lam = self.ridge(len(c_e), len(ctx.concepts))
        inputs = torch.cat([c_e, c_p])
        scales = torch.cat([torch.ones(len(c_e)), torch.full((len(c_p),), cfg.train_preserve_scale)])
        for w in kv.values():
            w0 = w.detach().float()
            w.copy_(closed_form_edit(w0, inputs, torch.cat([c_a @ w0.T, c_p @ w0.T]), lam, scales))
        return len(c_e)

    def train_lora(self, ctx: StageContext, kv: dict[str, nn.Parameter], batches: list[dict[str, Any]],
                   tokens: dict[str, torch.Tensor], concept: str) -> dict[str, torch.Tensor]:
        """(b) One LoRA against the concept's attention inside its regions; returns its B A per weight."""
        cfg = self.config
        modules = dict(ctx.unet.named_modules())
        loras = {}
        for n in kv:
            lora = _LoRA(kv[n], cfg.lora_rank, ctx.generator, cfg.lora_init)
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
                    loss = attention_loss(rec.maps, b["regions"], cfg.loss)
                    check_finite(L_attn=loss)
                    ctx.accelerator.backward(loss)
                    if cfg.max_grad_norm is not None:
                        ctx.accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
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
        xs = [tok["embeds"].flatten(0, 1) for tok in tokens]
        lam = self.ridge(sum(len(x) for x in xs), len(xs))
        scales = torch.cat([torch.ones(sum(len(x) for x in xs)), torch.full((len(c_p),), cfg.fuse_preserve_scale)])
        for n, w in kv.items():
            w1 = w.detach().float()
            targets = [x @ (w1 + delta[n].float()).T for x, delta in zip(xs, deltas)] + [c_p @ w1.T]
            w.copy_(closed_form_edit(w1, torch.cat([*xs, c_p]), torch.cat(targets), lam, scales))

    def fit_stage(self, ctx: StageContext) -> dict[str, Any]:
        kv = self.trainable_parameters(ctx.unet)
        tokens = self.token_batch(ctx)
        batches = [self.draw_batches(ctx, k, tokens[k]) for k in range(len(ctx.concepts))]  # masks: stage start
        c_p = self._preserved(ctx)
        erased = self.refine(ctx, kv, c_p)
        deltas = [self.train_lora(ctx, kv, batches[k], tokens[k], d.name) for k, d in enumerate(ctx.concepts)]
        self.fuse(ctx, kv, deltas, tokens, c_p)
        return {"refined_tokens": erased, "loras": len(deltas)}
