"""The fair-benchmark protocol (issue 12): what is tuned where, fixed in a file before any run.

A protocol names a *development* concept list (disjoint from the test targets), splits the kept
classes into dev-kept and test-kept, gives every method the same number of settings (a grid over the
hyperparameters that matter for it), the selection rule, and the seeds of the test runs:

    dev_concepts: [trumpet, rabbit, ...]        # tuned on
    test_concepts: [tropical fish, ...]         # reported on, never tuned on
    settings_per_method: 8
    grids: {sculpting: {lambda_kd: [...], lr: [...]}, uce: {...}, ...}
    seeds: [0, 1, 2]

This module reads and checks a protocol (every error names the method and field), applies the
selection rule, and computes the intervals the test table reports. sculpt.bench_protocol runs it
(`sculpt bench --protocol FILE`).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class ProtocolError(ValueError):
    """A protocol that cannot be run; the message names the method and field."""


class Protocol(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "emoji"
    dev_concepts: list[str] = Field(min_length=1)
    test_concepts: list[str] = Field(min_length=1)
    settings_per_method: int = Field(8, ge=1, description="the same tuning budget for every method")
    grids: dict[str, dict[str, list[Any]]]
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    n_dev: int = Field(16, ge=1, description="pictures per prompt on the development list")
    n_test: int = Field(50, ge=1, description="pictures per prompt on the test targets")
    max_dev_total_acc: float = Field(0.10, ge=0, le=1, description="the selection rule's forgetting bar")

    @model_validator(mode="after")
    def _consistent(self) -> "Protocol":
        overlap = sorted(set(map(str.casefold, self.dev_concepts)) & set(map(str.casefold, self.test_concepts)))
        if overlap:
            raise ValueError(f"development and test concepts overlap: {', '.join(overlap)} (tuning on the test set)")
        return self

    def settings(self, method: str) -> list[dict[str, Any]]:
        """The method's grid as a list of settings (the cartesian product, in file order)."""
        grid = self.grids[method]
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]

    def kept_split(self, classes: list[str]) -> tuple[list[str], list[str]]:
        """Dev-kept and test-kept classes: every class that is neither a dev nor a test concept,
        alternating in the benchmark's order (a rule fixed here, not chosen on results)."""
        gone = {c.casefold() for c in self.dev_concepts + self.test_concepts}
        rest = [c for c in classes if c.casefold() not in gone]
        return rest[0::2], rest[1::2]


def check_protocol(p: Protocol, known_classes: list[str] | None = None) -> None:
    """Every method registered, every grid field a field of that method's config with valid values,
    the same number of settings for every method, every concept known to the benchmark."""
    from sculpt.methods import available_methods, get_method

    for method, grid in p.grids.items():
        if method not in available_methods():
            raise ProtocolError(f"grids.{method}: unknown method (known: {', '.join(available_methods())})")
        fields = get_method(method).config_class.model_fields
        for key, values in grid.items():
            if key not in fields:
                raise ProtocolError(f"grids.{method}.{key}: not a setting of {method} "
                                    f"(its settings: {', '.join(sorted(fields))})")
            if not values:
                raise ProtocolError(f"grids.{method}.{key}: no values")
        count = len(p.settings(method))
        if count != p.settings_per_method:
            raise ProtocolError(f"grids.{method}: {count} settings, the protocol gives every method "
                                f"{p.settings_per_method}")
        for setting in p.settings(method):
            try:
                get_method(method).config_class(**setting)
            except ValueError as exc:
                raise ProtocolError(f"grids.{method}: setting {setting} is invalid: {exc}") from None
    if known_classes is not None:
        known = {c.casefold() for c in known_classes}
        for where in ("dev_concepts", "test_concepts"):
            missing = [c for c in getattr(p, where) if c.casefold() not in known]
            if missing:
                raise ProtocolError(f"{where}: not in the benchmark: {', '.join(missing)}")


def load_protocol(path: str | Path, known_classes: list[str] | None = None) -> Protocol:
    path = Path(path)
    try:
        p = Protocol(**yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError, ValueError, TypeError) as exc:
        raise ProtocolError(f"{path}: {exc}") from None
    check_protocol(p, known_classes)
    return p


def select(results: list[dict[str, Any]], max_total_acc: float = 0.10) -> dict[str, Any]:
    """The selection rule, stated before any run: among the settings whose dev Total Acc is at most
    `max_total_acc`, the highest dev-kept accuracy, ties broken by coherence; if none qualifies, the
    lowest dev Total Acc. results: dicts with total_acc, kept_acc, coherence (and the setting)."""
    if not results:
        raise ValueError("select: no results")
    qualified = [r for r in results if r["total_acc"] <= max_total_acc]
    if qualified:
        return max(qualified, key=lambda r: (r["kept_acc"], r.get("coherence") or 0.0))
    return min(results, key=lambda r: r["total_acc"])


def bootstrap_interval(values: dict[tuple[int, str], float], rounds: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of a per-(seed, class) score, resampling seeds and classes
    independently (both vary between replications of the benchmark). Deterministic for a seed."""
    if not values:
        raise ValueError("bootstrap_interval: no values")
    seeds = sorted({s for s, _ in values})
    classes = sorted({c for _, c in values})
    rng = random.Random(seed)
    mean = sum(values.values()) / len(values)
    draws = []
    for _ in range(rounds):
        ss = [rng.choice(seeds) for _ in seeds]
        cs = [rng.choice(classes) for _ in classes]
        picked = [values[(s, c)] for s in ss for c in cs if (s, c) in values]
        draws.append(sum(picked) / len(picked))
    draws.sort()
    lo = draws[int((1 - level) / 2 * rounds)]
    hi = draws[min(rounds - 1, int((1 + level) / 2 * rounds))]
    return mean, lo, hi
