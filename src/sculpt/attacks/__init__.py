"""Attacks on erased models, one module each, behind the interface in `base.py`; `run.attack` runs
them and measures how often the erased concept comes back (`sculpt attack`)."""

from sculpt.attacks.base import Attack, AttackConfig, AttackError, AttackResult, AttackTarget, Sampling, \
    available_attacks, get_attack, make_attack, register
from sculpt.attacks import unlearndiffatk  # noqa: F401  (registers "unlearndiffatk")
from sculpt.attacks import ring_a_bell  # noqa: F401  (registers "ring-a-bell")
from sculpt.attacks import textual_inversion  # noqa: F401  (registers "textual-inversion")
from sculpt.attacks import relearning  # noqa: F401  (registers "relearning")

__all__ = ["Attack", "AttackConfig", "AttackError", "AttackResult", "AttackTarget", "Sampling",
           "available_attacks", "get_attack", "make_attack", "register"]
