"""SPEED (Li et al., ICLR 2026): a closed-form edit of the cross-attention value (optionally key)
projections that is confined to the null space of the preserved concepts' text embeddings, so the
preserved concepts' outputs do not move at all, and that leaves the empty prompt's tokens exactly
where they are.

Per edited projection W [out, D], with c_t the target tokens (the last word token of each concept
word), c_a their anchors (the same token of the superclass word), n of them:

    S_tt = 1/n sum c_t c_t^T            R = W (C_a - C_t)            (W C_a: where the targets should go)

    retained set (the edit must not touch these):
      candidates c_r: the preserved words' last tokens (superclasses, `preserve`), minus any stage target
      (IPF)  Influence-based Prior Filtering: keep the c_r the unconstrained edit would move most,
             ||D_0 c_r|| > mean ||D_0 c_r||,  D_0 = R C_t^T / n (m I + S_tt)^-1
      (DPA)  Directed Prior Augmentation: aug_num copies c_r + z v, z ~ N(0, m), v the right
             singular vector of W with the smallest singular value (a direction W barely maps),
             kept where ||D_0 c'|| exceeds the copies' mean
      + the tokens of the concepts erased in earlier stages (their current, erased outputs are kept)
    S_r = mean c c^T over that set;  B [D, r] = orthonormal eigenvectors of S_r with eigenvalue < tau m
    (P = B B^T: the null space of the retained set)

    (IEC)  Invariant Equality Constraints: K [D, 4] = the empty prompt's first token and three
           k-means centres of its other tokens (what classifier-free guidance's unconditional
           branch reads); the edit must satisfy Delta K = 0

    Delta = argmin_{Delta = Delta P, Delta K = 0}  1/n ||(W + Delta) C_t - W C_a||^2 + alpha m ||Delta||^2
          = Y B^T,  with  A = B^T S_tt B + alpha m I_r,  H = R C_t^T B / n,  G = B^T K:
            Y = H A^-1 (I - G (G^T A^-1 G + lamb I)^-1 G^T A^-1)           (`null_space_edit`)

Delta = Delta P makes Delta c_r = 0 for every retained token up to the eigenvalues below tau m, and
Delta K = 0 holds exactly with lamb = 0 (lamb > 0 relaxes it). This is the authors' closed form
(`train_erase_null.py`: W (S_at - S_tt) P (I - M K (K^T P M K + lamb I)^-1 K^T P) M with
M = (S_tt P + alpha I)^-1) written in the coordinates of the null space; the two agree to machine
precision.

Scale rule: tau, alpha and the augmentation's noise are in units of the text encoder's squared token
norm. They are multiplied by m = ||c||^2 / D averaged over the empty prompt's token states, which is
about 1 for SD 1.x's CLIP states (so the numbers are the authors' there) and about 0.2 for the emoji
world's MiniLM states. lamb is dimensionless and is not scaled.

Defaults: the authors' few-concept settings (value projections only, aug_num 10, tau 0.1, alpha 1,
lamb 0, the filter on; their multi-concept runs use tau 1e-4, alpha 0.05 and no filter). Differences
from the authors' code, and why:
- Anchors are the concepts' superclasses (the authors: the empty prompt for instances, "art" for
  styles, "person" for celebrities), as every method in this project maps a concept onto its superclass.
- The retained candidates are the superclasses of this and the earlier stages' concepts plus
  `preserve` (the authors: a CSV of a thousand names of the target's domain, which this project's
  concepts do not come with).
- IPF runs only when the candidates reach rank saturation (at least D of them) in `filter: auto`:
  the authors turn it off by hand for retain sets below that (`--disable_filter`, README).
- Sequential stages: the concepts erased earlier join the retained set (after IPF, so they are never
  filtered out): the null-space constraint then keeps their edited outputs, so they stay erased.
- The scale rule above (the authors' numbers are for CLIP's states only).
- Numerics: float64 throughout, a pseudo-inverse for (G^T A^-1 G + lamb I) (a constraint the
  null space already satisfies, K inside the retained span, is dropped instead of blowing up the
  inverse), a seeded k-means++ instead of kmeans_pytorch's random start, the augmentation's copies
  kept by their mean over the whole retained set (the authors: per chunk of 128).
- Not implemented: the implicit-concept path (every token of "nudity" and a prompt list).
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from sculpt.config import fill_template
from sculpt.data.prepare import encode_token_states
from sculpt.methods.base import ErasureMethod, MethodConfig, register
from sculpt.models.cross_attention import last_word_position
from sculpt.stage import StageContext

_PROJECTIONS = {"v": ("attn2.to_v.weight",), "k": ("attn2.to_k.weight",), "kv": ("attn2.to_k.weight", "attn2.to_v.weight")}


class SPEEDConfig(MethodConfig):
    """Defaults: the authors' few-concept settings (train_erase_null.py, scripts/eval_few.sh)."""

    edit: Literal["v", "k", "kv"] = Field("v", description="which attn2 projections: the authors edit values only")
    threshold: float = Field(0.1, gt=0, description="tau: eigenvalues of S_r below tau * m span the null space")
    retain_scale: float = Field(1.0, gt=0, description="alpha: ridge on ||Delta||^2, times m")
    lamb: float = Field(0.0, ge=0, description="0: the invariant tokens' outputs are kept exactly")
    aug_num: int = Field(10, ge=0, description="DPA copies per retained token (0: no augmentation)")
    filter: Literal["auto", "on", "off"] = Field(
        "auto", description="IPF; auto: only when the retained candidates reach rank saturation (>= D)")
    invariant_clusters: int = Field(3, ge=0, description="k-means centres of the empty prompt's tokens in K")
    preserve: list[str] = Field(default_factory=list, description="extra words to keep (the retained candidates)")
    preserve_superclasses: bool = Field(True, description="the superclasses (this and earlier stages') are retained candidates")
    prompt_template: str = Field("{}", description="the authors encode the bare word")


@torch.no_grad()
def last_token_states(pipe, texts: list[str], device) -> torch.Tensor:
    """[n, D]: each text's last word token (the one before end-of-text), as the UNet reads it."""
    if not texts:
        return torch.zeros(0, pipe.unet.config.cross_attention_dim, dtype=torch.float64, device=device)
    states = encode_token_states(pipe, texts)
    pos = last_word_position(pipe.tokenizer, texts)
    return states[torch.arange(len(texts)), pos].double().to(device)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """[k, D] centres of x [n, D] (Lloyd's algorithm from a k-means++ start)."""
    k = min(k, len(x))
    centres = [x[int(torch.randint(len(x), (1,), generator=generator))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).pow(2).amin(1)
        if d2.sum() <= 0:
            break
        centres.append(x[int(torch.multinomial((d2 / d2.sum()).float().cpu(), 1, generator=generator))])
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(len(c))])
        if torch.equal(new, c):
            break
        c = new
    return c


@torch.no_grad()
def null_space_edit(w: torch.Tensor, c_t: torch.Tensor, c_a: torch.Tensor, basis: torch.Tensor,
                    invariant: torch.Tensor, alpha: float, lamb: float) -> torch.Tensor:
    """Delta [out, D] = argmin 1/n ||(W + Delta) C_t - W C_a||^2 + alpha ||Delta||^2 over Delta = Y B^T
    (rows in the null space spanned by `basis` B [D, r]), subject to Delta K = 0 (K = invariant^T):

        A = B^T S_tt B + alpha I,  H = W (C_a - C_t) C_t^T B / n,  G = B^T K
        Y = H A^-1 - H A^-1 G (G^T A^-1 G + lamb I)^+ G^T A^-1

    c_t, c_a: [n, D] rows; invariant: [k, D] rows. float64."""
    w = w.double()
    n, r = len(c_t), basis.shape[1]
    if r == 0 or n == 0:
        return torch.zeros_like(w)
    tb = c_t @ basis  # [n, r]: B^T c_t
    a = tb.T @ tb / n + alpha * torch.eye(r, dtype=w.dtype, device=w.device)
    h = ((c_a - c_t) @ w.T).T @ tb / n  # [out, r]
    a_inv = torch.linalg.inv(a)
    y = h @ a_inv
    if len(invariant):
        g = basis.T @ invariant.T  # [r, k]
        inner = g.T @ a_inv @ g + lamb * torch.eye(g.shape[1], dtype=w.dtype, device=w.device)
        y = y - y @ g @ torch.linalg.pinv(inner, hermitian=True, rtol=1e-10) @ g.T @ a_inv
    return y @ basis.T


@register
class SPEED(ErasureMethod):
    """SPEED: closed-form cross-attention edit in the preserved concepts' null space (Li et al. 2026)."""

    name = "speed"
    config_class = SPEEDConfig

    def trainable_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in unet.named_parameters() if n.endswith(_PROJECTIONS[self.config.edit])}

    # -- the token sets ------------------------------------------------------------------------------

    def _words(self, data) -> list[str]:
        return [fill_template(self.config.prompt_template, w) for w in data.concept.words]

    def token_sets(self, ctx: StageContext) -> dict[str, torch.Tensor]:
        """c_t / c_a (targets and their anchors), the retained candidates c_r, the earlier stages'
        concepts c_prev, and the invariant tokens K of the empty prompt (all [*, D] rows, float64)."""
        cfg = self.config
        targets, anchors = [], []
        for d in ctx.concepts:
            for w in self._words(d):
                targets.append(w)
                anchors.append(fill_template(cfg.prompt_template, d.concept.superclass))
        target_words = {w.casefold() for d in ctx.concepts for w in d.concept.words}
        stages = [*ctx.previous, *ctx.concepts]  # every superclass so far: an earlier one must not drift either
        kept = list(cfg.preserve) + ([d.concept.superclass for d in stages] if cfg.preserve_superclasses else [])
        # as the authors: no retained text that names a target
        kept = [w for w in dict.fromkeys(kept)
                if not any(re.search(rf"\b{re.escape(t)}\b", w.casefold()) for t in target_words)]
        previous = [w for d in ctx.previous for w in self._words(d)]
        null = encode_token_states(ctx.pipe, [""])[0].double().to(ctx.device)  # [L, D]
        centres = kmeans(null[1:], cfg.invariant_clusters, torch.Generator().manual_seed(ctx.seed)) \
            if cfg.invariant_clusters else null[:0]
        return {
            "c_t": last_token_states(ctx.pipe, targets, ctx.device),
            "c_a": last_token_states(ctx.pipe, anchors, ctx.device),
            "c_r": last_token_states(ctx.pipe, [fill_template(cfg.prompt_template, w) for w in kept], ctx.device),
            "c_prev": last_token_states(ctx.pipe, previous, ctx.device),
            "invariant": torch.cat([null[:1], centres]),
            "m": null.pow(2).sum(-1).mean() / null.shape[1],  # the scale rule's m
        }

    # -- IPF, DPA, the null space ----------------------------------------------------------------------

    def retained(self, w: torch.Tensor, tok: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The retained set of one projection: IPF-filtered candidates, the earlier stages' concepts,
        and their DPA copies (rows, float64)."""
        cfg = self.config
        c_t, c_a, m = tok["c_t"], tok["c_a"], float(tok["m"])
        s_tt = c_t.T @ c_t / len(c_t)
        eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        # D_0 = W (S_at - S_tt)(m I + S_tt)^-1: the edit without any constraint, to rank influence
        d0 = torch.linalg.solve(m * eye + s_tt, (((c_a - c_t) @ w.T).T @ c_t / len(c_t)).T).T
        c_r = tok["c_r"]
        use_filter = cfg.filter == "on" or (cfg.filter == "auto" and len(c_r) >= w.shape[1])
        if use_filter and len(c_r):
            influence = (c_r @ d0.T).norm(dim=1)
            c_r = c_r[influence > influence.mean()]
        base = torch.cat([c_r, tok["c_prev"]])
        copies = base[:0]
        if cfg.aug_num and len(base):
            v = torch.linalg.svd(w, full_matrices=False).Vh[-1]  # least-amplified input direction of W
            z = torch.randn(cfg.aug_num * len(base), 1, generator=generator, dtype=w.dtype).to(w.device) * math.sqrt(m)
            copies = base.repeat(cfg.aug_num, 1) + z * v
            influence = (copies @ d0.T).norm(dim=1)
            copies = copies[influence > influence.mean()]
        return torch.cat([base, copies]), {"filtered_candidates": len(c_r), "augmented": len(copies)}

    def null_basis(self, retained: torch.Tensor, dim: int, m: float) -> torch.Tensor:
        """B [D, r]: eigenvectors of S_r = mean c c^T with eigenvalue < tau m (all of R^D if nothing is retained)."""
        if not len(retained):
            return torch.eye(dim, dtype=torch.float64, device=retained.device)
        evals, evecs = torch.linalg.eigh(retained.T @ retained / len(retained))
        return evecs[:, evals < self.config.threshold * m]

    def fit_stage(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.config
        tok = self.token_sets(ctx)
        m = float(tok["m"])
        generator = torch.Generator().manual_seed(ctx.seed)
        summary: dict[str, Any] = {"targets": len(tok["c_t"]), "candidates": len(tok["c_r"]),
                                   "previous": len(tok["c_prev"]), "m": round(m, 6)}
        per_layer = []
        with torch.no_grad():
            for p in self.trainable_parameters(ctx.unet).values():
                w = p.detach().double()
                kept, info = self.retained(w, tok, generator)
                basis = self.null_basis(kept, w.shape[1], m)
                delta = null_space_edit(w, tok["c_t"], tok["c_a"], basis, tok["invariant"], cfg.retain_scale * m, cfg.lamb)
                p.copy_((w + delta).to(p.dtype))
                per_layer.append({**info, "null_space_dim": basis.shape[1]})
        for key in ("filtered_candidates", "augmented", "null_space_dim"):  # ranges over the edited layers
            values = [x[key] for x in per_layer]
            summary[key] = [min(values), max(values)] if values else []
        ctx.log({"step": 0, **summary})
        return summary
