"""The one interface every erasure method implements, and the registry that finds them.

A method is a config class (its paper's defaults) plus `fit_stage`, which edits the UNet in place
so that the stage's concepts are forgotten. The shared loop in `sculpt.erase` does everything else:
loading, data, stages, patches, logs. Adding a method touches no other method:

    @register
    class MyMethod(ErasureMethod):
        name = "mine"
        config_class = MyConfig
        def trainable_parameters(self, unet): ...
        def fit_stage(self, ctx): ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

_REGISTRY: dict[str, type["ErasureMethod"]] = {}


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErasureMethod(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_class()

    @abstractmethod
    def trainable_parameters(self, unet: nn.Module) -> dict[str, nn.Parameter]:
        """The UNet tensors this method may change (a patch holds at most these)."""

    @abstractmethod
    def fit_stage(self, ctx) -> dict[str, Any]:
        """Forget ctx.concepts (keeping ctx.previous forgotten); return a summary of the stage."""

    @classmethod
    def description(cls) -> str:
        """One line for `sculpt methods`: the first line of the class docstring (every method has one)."""
        doc = (cls.__doc__ or "").strip()
        if not doc:
            raise TypeError(f"method {cls.name!r} has no docstring: say in one line what it does")
        return doc.splitlines()[0]

    def steps_per_stage(self) -> int:
        """Optimisation steps in one stage (for progress bars); 0 for closed-form methods."""
        return 0

    def neighbours_wanted(self) -> int:
        """How many neighbours at risk per concept the method preserves (sculpt.data.neighbours); the
        run then gives the stage their data as ctx.neighbours. 0: the method has no such term."""
        return 0

    def keeps_siblings(self) -> bool:
        """Whether the neighbours also include the concept's siblings under its superclass (where the
        model's world has a taxonomy)."""
        return False

    # State carried from one stage to the next (e.g. the freeze mask); saved with checkpoints.
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def register(cls: type[ErasureMethod]) -> type[ErasureMethod]:
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[ErasureMethod]:
    import sculpt.methods  # noqa: F401  (registers the built-in methods)

    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    import sculpt.methods  # noqa: F401

    return sorted(_REGISTRY)
