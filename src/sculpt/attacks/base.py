"""The one interface every attack implements, the registry that finds them, and the denoising loss
they share.

An attack tries to make a model draw a concept it was made to forget, and hands back the pictures it
drew. It is a config class (the published budget as defaults, a smaller one per built-in world where
the CPU asks for it) plus `run`. `sculpt.attacks.run.attack` does everything else: loading, patches,
the base model's pictures an attacker learns from, classifying, intervals, files, the ledger.
Adding an attack touches no other attack:

    @register
    class MyAttack(Attack):
        '''One line for `sculpt attack --help`.'''
        name = "mine"
        config_class = MyConfig
        world_budgets = {"emoji": {"steps": 100}}
        def run(self, pipe, target, sampling, seed) -> AttackResult: ...

Every attack leaves the pipeline's weights as it found them (relearning hands its fine-tuned tensors
back in the result instead); `run.attack` checks this by hash after every attack.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from sculpt.data.prepare import encode_pictures, stable_seed  # noqa: F401 (encode_pictures: the attacks import it from here)
from sculpt.eval.sampling import ImageCache, SamplerSettings

_REGISTRY: dict[str, type["Attack"]] = {}


class AttackError(ValueError):
    """An unknown attack, a bad budget, or a target an attack cannot work on."""


class AttackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class AttackTarget:
    """What an attacker knows about the erased concept."""

    concept: str  # "poodle"
    prompt: str  # what evaluation asks the model to draw: "a photo of a poodle"
    synonyms: tuple[str, ...] = ()  # other prompts that name it ("a photo of a white poodle")
    superclass: str | None = None  # "dog"
    neutral_prompt: str = "a photo of an object"  # a prompt without it: its superclass's, "a photo of a dog"
    # Pictures drawn by the BASE model (before any erasure), for each prompt an attack asked for in
    # pictures_needed(): the attacker's examples of the concept, or of a class it fine-tunes on.
    pictures: dict[str, list[Image.Image]] = field(default_factory=dict)
    # Prompt embeddings [L, D] made by the BASE model's text encoder (the public one), for each prompt an
    # attack asked for in texts_needed(): what a model-agnostic attacker computes without the erased model.
    text_states: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Sampling:
    """How an attack draws its pictures: the evaluation's sampler and seeds, so that picture i of an
    attack starts from the same noise as picture i of the plain prompt in `sculpt eval`."""

    settings: SamplerSettings
    seeds: tuple[int, ...]
    batch_size: int = 64
    cache: ImageCache | None = None  # for pictures of plain text prompts (relearning); never for embeddings


@dataclass
class AttackResult:
    attack: str
    concept: str
    images: list[Image.Image]  # one per Sampling.seeds, in order
    seeds: list[int]
    seed: int  # the attack's own randomness (initialisation, noise, timesteps, search)
    steps: int  # optimisation steps (or search generations) spent
    seconds: float  # wall time of the optimisation or search
    sampling_seconds: float = 0.0  # wall time of drawing `images`
    prompt: str | None = None  # a readable prompt, when the attack ends in real tokens
    embeddings: torch.Tensor | None = None  # [1, L, D] the prompt embedding the pictures were drawn with
    token_vectors: torch.Tensor | None = None  # [k, d] learned input-token vectors (prefix or new token)
    weights: dict[str, torch.Tensor] | None = None  # fine-tuned UNet tensors (relearning), by parameter name
    losses: list[float] = field(default_factory=list)  # the optimised objective, step by step
    details: dict[str, Any] = field(default_factory=dict)  # attack-specific numbers (loss before / after, ...)


class Attack(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[AttackConfig]]
    # Smaller budgets for the built-in worlds, keyed by model name ("emoji"): overrides of the
    # published defaults, each stated in the attack's docstring.
    world_budgets: ClassVar[dict[str, dict[str, Any]]] = {}
    # True for an attack that changes weights (result.weights): run.attack then re-measures the kept
    # classes with them, since a fine-tune can cost the model what the erasure kept.
    weights_tuned: ClassVar[bool] = False

    def __init__(self, config: AttackConfig | None = None):
        self.config = config if config is not None else self.config_class()

    def pictures_needed(self, target: AttackTarget) -> dict[str, int]:
        """Prompt -> number of base-model pictures this attack learns from (target.pictures)."""
        return {}

    def texts_needed(self, target: AttackTarget) -> list[str]:
        """Prompts whose embeddings by the base model's text encoder this attack uses (target.text_states)."""
        return []

    def check(self, target: AttackTarget) -> None:
        """Raise AttackError if this attack, with its settings, cannot work on `target` (called before
        any picture is drawn)."""

    @abstractmethod
    def run(self, pipe, target: AttackTarget, sampling: Sampling, seed: int) -> AttackResult:
        """Attack `pipe` (the erased model) for `target`; draw one picture per sampling seed."""

    @classmethod
    def description(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        if not doc:
            raise TypeError(f"attack {cls.name!r} has no docstring: say in one line what it does")
        return doc.splitlines()[0]

    def generator(self, seed: int, target: AttackTarget) -> torch.Generator:
        """The attack's randomness: a function of (seed, attack, concept) only."""
        return torch.Generator().manual_seed(stable_seed(seed, f"{self.name}:{target.concept}"))

    def result(self, target: AttackTarget, sampling: Sampling, seed: int, **fields) -> AttackResult:
        return AttackResult(attack=self.name, concept=target.concept, seeds=list(sampling.seeds), seed=seed, **fields)


def register(cls: type[Attack]) -> type[Attack]:
    _REGISTRY[cls.name] = cls
    return cls


def get_attack(name: str) -> type[Attack]:
    import sculpt.attacks  # noqa: F401  (registers the built-in attacks)

    if name not in _REGISTRY:
        raise AttackError(f"unknown attack {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_attacks() -> list[str]:
    import sculpt.attacks  # noqa: F401

    return sorted(_REGISTRY)


def make_attack(name: str, model: str = "", budget: dict[str, Any] | None = None) -> Attack:
    """The attack `name` with its published budget, the world's smaller one for `model` on top (where
    it has one), and `budget` on top of that; a bad name or setting raises AttackError naming it."""
    cls = get_attack(name)
    settings = {**cls.world_budgets.get(model, {}), **(budget or {})}
    try:
        return cls(cls.config_class(**settings))
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            known = ", ".join(cls.config_class.model_fields)
            raise AttackError(f"attack {name!r}: no budget setting {key!r}; its settings: {known}") from None
        raise AttackError(f"attack {name!r}: budget {key}={err.get('input')!r}: {err['msg']}") from None


# -- what the gradient attacks share ---------------------------------------------------------------


@contextmanager
def frozen(*modules: torch.nn.Module):
    """Modules in eval mode with no parameter gradients while an attack optimises its own tensors
    (a freshly built text encoder would otherwise apply dropout and collect weight gradients);
    every module's mode and requires_grad flags are restored afterwards."""
    modules = tuple(m for m in modules if isinstance(m, torch.nn.Module))
    modes = [m.training for m in modules]
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for m in modules:
        m.eval().requires_grad_(False)
    try:
        yield
    finally:
        for m, mode, fl in zip(modules, modes, flags):
            m.train(mode)
            for p, f in zip(m.parameters(), fl):
                p.requires_grad_(f)


@dataclass
class NoisyBatch:
    """Pictures x_0 with their noise eps and timesteps t: one draw of the denoising objective."""

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor

    @classmethod
    def draw(cls, pipe, latents: torch.Tensor, n: int, generator: torch.Generator) -> "NoisyBatch":
        """n pictures picked with replacement, t ~ U{0, ..., T-1}, eps ~ N(0, I), all from `generator`."""
        which = torch.randint(0, len(latents), (n,), generator=generator)
        steps = pipe.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (n,), generator=generator)
        x0 = latents[which]
        noise = torch.randn(x0.shape, generator=generator)
        return cls(x0, noise, t)


def denoising_loss(pipe, batch: NoisyBatch, embeds: torch.Tensor) -> torch.Tensor:
    """The model's own denoising loss on known pictures under prompt embeddings c ([B or 1, L, D]):

        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
        L   = mean || y - eps_theta(x_t, t; c) ||^2,   y = eps (or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0)

    Low L means the model, given c, reconstructs these pictures: the diffusion model as its own
    classifier of "c shows this"."""
    unet = pipe.unet
    device = unet.device
    abar = pipe.scheduler.alphas_cumprod.to(device)[batch.t.to(device)].view(-1, 1, 1, 1)
    x0, noise = batch.x0.to(device), batch.noise.to(device)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    if pipe.scheduler.config.prediction_type == "v_prediction":
        target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    else:
        target = noise
    embeds = embeds.expand(len(x0), -1, -1) if embeds.shape[0] == 1 else embeds
    pred = unet(x_t.to(unet.dtype), batch.t.to(device), encoder_hidden_states=embeds.to(unet.dtype)).sample
    return F.mse_loss(pred.float(), target.float())


class Timer:
    """Seconds since creation (wall time), for a result's budget."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.start, 3)
