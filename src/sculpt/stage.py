"""What a method sees during one stage: the model, the stage's data, and the shared denoising
plumbing (noise, timesteps, predictions, optimiser set-up with accelerate, logging).

Every gradient method is a short loop over these helpers, so the loss of each method reads like
its equation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from sculpt.config import CheckConfig
from sculpt.data.prepare import ConceptData, NeighbourData
from sculpt.models.conditioning import conditioning


class LossDivergedError(RuntimeError):
    """A loss term became NaN or infinite; the stage stops and the last good state is kept."""


class StopRequested(Exception):
    """Ctrl-C was pressed: the stage stops at the end of the current step."""


@dataclass
class StageContext:
    pipe: Any  # the diffusers pipeline being edited (pipe.unet is changed in place)
    accelerator: Any
    index: int  # 0-based stage number
    concepts: list[ConceptData]  # forgotten in this stage
    previous: list[ConceptData]  # forgotten in earlier stages (must stay forgotten)
    seed: int
    log_file: Path | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None
    empty_embeds: torch.Tensor | None = None  # [1, L, D], the unconditional embedding (encoded ""; SDXL: zeros)
    neighbours: list[NeighbourData] = field(default_factory=list)  # concepts to keep near this stage's
    stop_flag: dict | None = None  # set to {"stop": True} by the Ctrl-C handler
    gradient_checkpointing: bool = False  # the run's `train.gradient_checkpointing`
    generator: torch.Generator = field(init=False)
    _plain_unet: Any = field(default=None, init=False, repr=False)
    _walks: dict = field(default_factory=dict, init=False, repr=False)  # replace=False positions
    # Mid-stage checkpoints (see sculpt.erase): what a method saved before the process died, and where
    # it saves (tensors, JSON metadata) at most every checkpoint_every_s seconds.
    resume: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
    save_progress: Callable[[dict[str, torch.Tensor], dict[str, Any]], None] | None = None
    checkpoint_every_s: float = 300.0
    _last_save: float = field(default=0.0, init=False, repr=False)
    # The presence check (sculpt.presence): is each of this stage's concepts still drawn? None: no check.
    check: CheckConfig = field(default_factory=CheckConfig)
    presence: Any = None  # a sculpt.presence.PresenceCheck
    template: str = "a photo of a {}"

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed + 7919 * self.accelerator.process_index)
        from diffusers import DDPMScheduler

        # Training noise schedule = the model's own (same betas, same prediction type).
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.conditioning = conditioning(self.pipe)  # how the UNet reads a prompt embedding (SD, SDXL)

    # -- data ------------------------------------------------------------------------------------

    @property
    def unet(self) -> nn.Module:
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=self.generator)

    def concept_batch(self, n: int, data: list[ConceptData] | None = None, replace: bool = True):
        """n concept latents x_c with their concept prompt c and superclass prompt s (item-wise).

        replace=True: each item picks a concept, then one of its images and prompts, at random.
        replace=False: the images of all of `data` are walked in a random order, reshuffled when used
        up (epochs over the data, as a shuffled DataLoader gives); the prompt is drawn per item."""
        data = data if data is not None else self.concepts
        xs, cs, ss = [], [], []
        which = self._randint(len(data), n).tolist() if replace else self._walk(n, data, "latents")
        for k in which:
            k, j = (k, int(self._randint(len(data[k].latents), 1))) if replace else k
            d = data[k]
            xs.append(d.latents[j : j + 1])
            cs.append(d.prompt_embeds[self._randint(len(d.prompt_embeds), 1)])
            ss.append(d.anchor_embeds)
        return self._to(torch.cat(xs)), self._to(torch.cat(cs)), self._to(torch.cat(ss))

    def anchor_batch(self, n: int, data: list[ConceptData] | None = None, replace: bool = True):
        """n superclass latents x_s with their superclass prompt s (`replace` as in concept_batch)."""
        data = data if data is not None else self.concepts
        xs, ss = [], []
        which = self._randint(len(data), n).tolist() if replace else self._walk(n, data, "anchor_latents")
        for k in which:
            k, j = (k, int(self._randint(len(data[k].anchor_latents), 1))) if replace else k
            d = data[k]
            xs.append(d.anchor_latents[j : j + 1])
            ss.append(d.anchor_embeds)
        return self._to(torch.cat(xs)), self._to(torch.cat(ss))

    def neighbour_batch(self, n: int):
        """n neighbour latents with their own prompt, walked without replacement over every image of
        every neighbour (as concept_batch with replace=False)."""
        xs, cs = [], []
        for k, j in self._walk(n, self.neighbours, "latents", tag="neighbours"):
            xs.append(self.neighbours[k].latents[j : j + 1])
            cs.append(self.neighbours[k].prompt_embeds)
        return self._to(torch.cat(xs)), self._to(torch.cat(cs))

    def _walk(self, n: int, data: list, field_name: str, tag: str | None = None) -> list[tuple[int, int]]:
        """The next n (concept, image) pairs of a shuffled pass over every image of `data`; a new
        shuffled pass starts when one is used up (a batch may straddle two passes)."""
        key = (tag or field_name, tuple(d.word if tag else d.name for d in data))
        order, pos = self._walks.get(key, ([], 0))
        out: list[tuple[int, int]] = []
        while len(out) < n:
            if pos == len(order):
                pool = [(k, j) for k, d in enumerate(data) for j in range(len(getattr(d, field_name)))]
                order, pos = [pool[i] for i in torch.randperm(len(pool), generator=self.generator).tolist()], 0
            take = min(n - len(out), len(order) - pos)
            out += order[pos : pos + take]
            pos += take
        self._walks[key] = (order, pos)
        return out

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    # -- diffusion -------------------------------------------------------------------------------

    def timesteps(self, n: int) -> torch.Tensor:
        """n training timesteps, one per sample, uniform over the model's schedule."""
        return self._randint(self.noise_scheduler.config.num_train_timesteps, n).to(self.device)

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator).to(x.device, x.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return self.noise_scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network predicts: eps (SD 1.x, 2-base) or v (SD 2.x 768)."""
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        return noise

    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t; emb) (emb as sculpt.models.conditioning packs it: SDXL's pooled row included)."""
        with self.accelerator.autocast():
            return model(x_t, t, **self.conditioning.unet_inputs(emb, x_t)).sample.float()

    @torch.no_grad()
    def predict_with(self, weights: dict[str, torch.Tensor], x_t, t, emb) -> torch.Tensor:
        """The same UNet with some tensors swapped (e.g. a frozen teacher's cross-attention), without
        keeping a second copy of the whole model in memory."""
        if self._plain_unet is None:  # unwrapped once per stage, not at every step
            self._plain_unet = self.accelerator.unwrap_model(self.unet)
        unet = self._plain_unet
        with self.accelerator.autocast():
            out = torch.func.functional_call(unet, weights, (x_t, t), self.conditioning.unet_inputs(emb, x_t))
        return out.sample.float()

    # -- optimisation ----------------------------------------------------------------------------

    def prepare_training(self, params: dict[str, nn.Parameter], lr: float, total_steps: int,
                         schedule: str = "onecycle"):
        """Only `params` get gradients; Adam (no weight decay) + the LR schedule, through accelerate
        so the same loop runs on CPU, one GPU or several (`accelerate launch`)."""
        unet = self.unet
        unet.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        if self.gradient_checkpointing:  # recompute activations in backward: less memory, more time
            unet.enable_gradient_checkpointing()
        unet.train()
        optimizer = torch.optim.Adam(list(params.values()), lr=lr, weight_decay=0.0)
        if schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=lr, total_steps=max(total_steps, 1), anneal_strategy="cos"
            )
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        # The schedule is not given to accelerate: it would step it once per process per optimiser step,
        # and with N processes end the schedule after total/N steps. Stepped here, once per step.
        model, optimizer = self.accelerator.prepare(unet, optimizer)
        return model, optimizer, sched

    def per_process(self, n: int) -> int:
        """This process's share of a global batch of n (processes average their gradients, so the
        global batch, not the per-process one, is the method's batch size)."""
        k = self.accelerator.num_processes
        if n % k:
            raise ValueError(f"batch size {n} does not split over {k} processes; use a multiple of {k}")
        return n // k

    def loss_values(self, **terms: torch.Tensor) -> dict[str, float]:
        """The loss terms as floats, averaged over the processes (the global batch's), in one host sync;
        LossDivergedError in every process if one of them diverged (none is left waiting)."""
        if self.accelerator.num_processes == 1:
            return check_finite(**terms)
        stacked = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
        return check_finite(**dict(zip(terms, self.accelerator.reduce(stacked, reduction="mean"))))

    def mean_over_processes(self, value: float) -> float:
        """One number averaged over the processes (e.g. an epoch's mean L_f for best-epoch selection, so
        every process keeps the same epoch)."""
        if self.accelerator.num_processes == 1:
            return value
        return float(self.accelerator.reduce(torch.tensor([value], device=self.device), reduction="mean"))

    # fp16 loss scaling (accelerate's GradScaler; None without fp16): a gradient read for anything but
    # the optimiser's step (the Dynamic Mask's importance) must be unscaled first, and an overflow
    # step's gradients (inf/NaN: the scaler skips the step) must not be read at all.

    def unscale_gradients(self, optimizer) -> bool:
        """Divide the gradients by the loss scale, in place (the optimiser's step will not divide
        again); True if they are all finite. Without loss scaling: True, at no cost."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None:
            return True
        scaler.unscale_(getattr(optimizer, "optimizer", optimizer))
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def step_without_optimizer(self) -> None:
        """End a step that computed gradients but takes no optimiser step (the warm-up): the loss
        scaler still backs off after an overflow, as an optimiser step would have made it."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            scaler.update()

    def finish_training(self) -> None:
        self.unet.requires_grad_(False)
        self.unet.eval()
        # accelerate keeps every prepared optimizer alive (Adam state: 2x the trained tensors).
        self.accelerator.free_memory()

    # -- mid-stage checkpoints ---------------------------------------------------------------------

    def progress_due(self) -> bool:
        """Whether a method should save its stage state now (checkpoint_every_s since the last save).
        With several processes the main one decides and tells the others (a one-number broadcast),
        since every process takes part in the snapshot."""
        several = self.accelerator.num_processes > 1
        if self.save_progress is None and not several:
            return False
        due = False
        if self.save_progress is not None:
            now = time.monotonic()
            if self._last_save == 0.0:
                self._last_save = now
            if now - self._last_save >= self.checkpoint_every_s:
                self._last_save, due = now, True
        if several:
            from accelerate.utils import broadcast

            due = bool(broadcast(torch.tensor([int(due)], device=self.device), from_process=0).item())
        return due

    # -- the presence check (beyond the paper: a stage ends when its concepts are gone) ----------------

    @property
    def presence_check(self) -> Callable[[], dict[str, float]] | None:
        """() -> {concept: share of the check's pictures still showing it}, or None without a check."""
        if self.presence is None or not self.check.enabled:
            return None

        def run() -> dict[str, float]:
            with torch.no_grad():
                return self.presence(self.pipe, [d.concept for d in self.concepts], self.template)

        return run

    def start_presence_check(self) -> None:
        """Let the check see the model as the stage got it (the diffusion classifier draws its pictures)."""
        if self.presence_check is not None:
            with torch.no_grad():
                self.presence.start(self.pipe, [d.concept for d in self.concepts], self.template)

    def concepts_gone(self, shares: dict[str, float]) -> bool:
        return all(v <= self.check.max_share for v in shares.values())

    def check_summary(self, checks: list[dict[str, float]]) -> dict[str, Any]:
        """What the stage's summary, the ledger and the model card say about the check."""
        return {"judge": getattr(self.presence, "name", "?"), "pictures": self.check.pictures,
                "max_share": self.check.max_share, "shares": checks, "extra_rounds": len(checks) - 1,
                "gone": self.concepts_gone(checks[-1]),
                "remaining": sorted(c for c, v in checks[-1].items() if v > self.check.max_share)}

    def write_progress(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Save a method's snapshot (every process calls it; the main one writes)."""
        if self.save_progress is not None:
            self.save_progress(tensors, meta)

    def sampling_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The random generator's state and the positions of the shuffled passes: what a resumed
        stage needs to draw the same batches. With several processes, every process's (each draws
        its own part of the batch), gathered to all: `generator/<rank>`, `walks_by_rank`."""
        walks = [[f, list(names), [list(x) for x in order], pos] for (f, names), (order, pos) in self._walks.items()]
        state = self.generator.get_state()
        if self.accelerator.num_processes == 1:
            return {"generator": state}, {"walks": walks}
        from accelerate.utils import gather_object

        every = gather_object([(state.tolist(), walks)])
        tensors = {f"generator/{r}": torch.tensor(g, dtype=torch.uint8) for r, (g, _) in enumerate(every)}
        return tensors, {"walks_by_rank": [w for _, w in every]}

    def restore_sampling_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        rank = self.accelerator.process_index
        if "walks_by_rank" in meta:
            if len(meta["walks_by_rank"]) != self.accelerator.num_processes:
                raise RuntimeError(f"the mid-stage checkpoint was saved by {len(meta['walks_by_rank'])} processes, "
                                   f"this run has {self.accelerator.num_processes}: resume with as many")
            generator, walks = tensors[f"generator/{rank}"], meta["walks_by_rank"][rank]
        else:
            if self.accelerator.num_processes != 1:
                raise RuntimeError("the mid-stage checkpoint was saved by one process: resume with one")
            generator, walks = tensors["generator"], meta["walks"]
        self.generator.set_state(generator)
        self._walks = {(f, tuple(names)): ([tuple(x) for x in order], pos) for f, names, order, pos in walks}

    def log(self, record: dict[str, Any]) -> None:
        """Called once at the end of every optimisation step: records the step's metrics, and stops
        the stage here (a clean step boundary) if Ctrl-C was pressed."""
        record = {"stage": self.index, **record}
        if self.log_file is not None and self.accelerator.is_main_process:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.on_step is not None:
            self.on_step(record)
        if self.stop_flag and self.stop_flag.get("stop"):
            raise StopRequested("interrupted by the user")


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float())


def check_finite(**terms: torch.Tensor) -> dict[str, float]:
    """The scalar loss terms as floats, read in one host sync; LossDivergedError if one is NaN or infinite."""
    values = dict(zip(terms, torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()))
    for name, value in values.items():
        if not math.isfinite(value):
            raise LossDivergedError(f"loss term {name} is {value}; stopping the stage")
    return values
