"""The Dynamic Mask: which cross-attention entries an erasure stage may change.

Per weight matrix W (one mask each):

    importance   I_ij = sum over steps of |dL/dW_ij|          (accumulated, copied, never aliased)
    initial mask M_ij = 1  iff  I_ij is among the top p of the free entries of W
    every K steps, with tau(e) = tau_0 * (1 + cos(pi * e / E)) / 2 in epoch e of E, while e < 0.8 E:
        drop the round(tau * |M|) active entries of lowest I (importance since the last update),
        grow as many inactive free entries of highest I;   density stays p;   I <- 0
    gradient     dL/dW  <-  M * dL/dW

Entries in the global freeze mask F (changed for earlier concepts) are never free: they are
never selected, so a later stage cannot overwrite an earlier erasure.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def drop_ratio(epoch: int, epochs: int, tau0: float) -> float:
    """Turnover decayed with a cosine over the epochs: tau(e) = tau0 * (1 + cos(pi * e / E)) / 2."""
    return tau0 * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


class DynamicMask:
    def __init__(
        self,
        params: dict[str, nn.Parameter],
        density: float,
        frozen: dict[str, torch.Tensor] | None = None,
        signed_importance: bool = False,
    ):
        if not 0.0 < density <= 1.0:
            raise ValueError(f"mask density must be in (0, 1], got {density}")
        self.params = params
        self.density = density
        # signed_importance reproduces the authors' script: |sum of grads| instead of sum of |grads|.
        self.signed = signed_importance
        self.frozen = {
            n: (frozen[n].to(p.device) if frozen and n in frozen else torch.zeros_like(p, dtype=torch.bool))
            for n, p in params.items()
        }
        self.importance = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.active = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
        # Every entry that was active at some point of the stage: the only ones that can have moved.
        self.ever_active = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
        self.initialised = False

    # -- importance ------------------------------------------------------------------------------

    def _grad(self, n: str, p: nn.Parameter) -> torch.Tensor:
        if p.grad is None:
            # Training would go on without this mask (dense, or not at all): refuse instead.
            raise RuntimeError(f"no gradient reached {n}: the Dynamic Mask cannot act on it (were the model's "
                               "parameters replaced or wrapped after the mask was built?)")
        return p.grad

    @torch.no_grad()
    def accumulate(self) -> None:
        """I += |grad| (out-of-place on a fresh tensor: the gradient buffer is never stored)."""
        for n, p in self.params.items():
            g = self._grad(n, p).float()
            self.importance[n] += g if self.signed else g.abs()

    def _scores(self, n: str) -> torch.Tensor:
        return self.importance[n].abs() if self.signed else self.importance[n]

    def reset_importance(self) -> None:
        for imp in self.importance.values():
            imp.zero_()

    # -- mask ------------------------------------------------------------------------------------

    def n_target(self, n: str) -> int:
        free = int((~self.frozen[n]).sum())
        return int(round(self.density * free))

    @torch.no_grad()
    def initialise(self) -> None:
        """Top-p of each matrix's free entries by accumulated importance; then reset importance.

        Refuses all-zero importance (no warm-up step reached the mask, or every one overflowed): the
        top-p of zeros is a block of positions, not a choice."""
        if self.density < 1 and not any(bool(self._scores(n).any()) for n in self.params):
            raise RuntimeError("the Dynamic Mask has no importance to choose its first entries from (no warm-up "
                               "step gave a finite gradient); run at least one warm-up step")
        for n in self.params:
            scores = self._scores(n).flatten().masked_fill(self.frozen[n].flatten(), -math.inf)
            active = torch.zeros_like(scores, dtype=torch.bool)
            active[scores.topk(self.n_target(n)).indices] = True
            self.active[n] = active.view_as(self.active[n])
            self.ever_active[n] |= self.active[n]
        self.initialised = True
        self.reset_importance()

    @torch.no_grad()
    def update(self, tau: float) -> tuple[float, dict[str, torch.Tensor]]:
        """Drop/grow a fraction tau of each matrix's active entries. Returns the turnover (swapped
        entries / active entries, over all matrices) and, per matrix, the entries just dropped."""
        swapped, total, dropped = 0, 0, {}
        for n in self.params:
            active = self.active[n].flatten()
            scores = self._scores(n).flatten()
            grow_pool = ~active & ~self.frozen[n].flatten()
            k = min(int(round(tau * int(active.sum()))), int(grow_pool.sum()))
            total += int(active.sum())
            drop = torch.zeros_like(active)
            if k > 0:
                drop_idx = scores.masked_fill(~active, math.inf).topk(k, largest=False).indices
                grow_idx = scores.masked_fill(~grow_pool, -math.inf).topk(k).indices
                active[drop_idx] = False
                active[grow_idx] = True
                drop[drop_idx] = True
                swapped += k
            self.active[n] = active.view_as(self.active[n])
            self.ever_active[n] |= self.active[n]
            dropped[n] = drop.view_as(self.active[n])
        self.reset_importance()
        return (swapped / total if total else 0.0), dropped

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """grad <- M * grad, so only active entries move."""
        for n, p in self.params.items():
            self._grad(n, p).mul_(self.active[n])

    def current_density(self) -> float:
        """Active entries / free entries, over all matrices."""
        active = sum(int(a.sum()) for a in self.active.values())
        free = sum(int((~f).sum()) for f in self.frozen.values())
        return active / free if free else 0.0

    # -- freezing across concepts ------------------------------------------------------------------

    @torch.no_grad()
    def frozen_after_stage(
        self, start: dict[str, torch.Tensor], fraction: float
    ) -> dict[str, torch.Tensor]:
        """F <- F | (entries changed in this stage, the top `fraction` of each matrix by |delta W|).

        fraction = 1 freezes every changed entry (the literal reading of the paper); smaller values
        leave room for later concepts (with p = 0.5 and every changed entry frozen, a third concept
        would find no free weights at all)."""
        out = {}
        for n, p in self.params.items():
            delta = (p.detach() - start[n].to(p.device)).abs().flatten()
            changed = delta > 0
            k = min(int(round(fraction * delta.numel())), int(changed.sum()))
            new = torch.zeros_like(changed)
            if k > 0:
                new[delta.masked_fill(~changed, -1.0).topk(k).indices] = True
            out[n] = self.frozen[n] | new.view_as(self.frozen[n])
        return out


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                          entries: dict[str, torch.Tensor]) -> None:
    """Zero Adam's moments on dropped entries: with zero gradient and zero moments Adam's update is
    exactly 0, so an inactive entry stays bit-identical (momentum would otherwise keep moving it)."""
    for n, p in params.items():
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state and n in entries:
                state[key].masked_fill_(entries[n], 0.0)
