"""Concept specs and run settings: the YAML a user writes, validated before any work starts.

A spec lists the concepts to forget, in order, each anchored on a superclass, plus the run's
settings. Every error names the field and the YAML line it comes from, e.g.

    spec.yaml:14: concepts.2.superclass: a concept cannot be its own superclass ('fish')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A concept spec that cannot be used; the message names the file, line and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_name(value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{what} is empty")
    if "\x00" in value or any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{what} {value!r} contains a control character")
    if "/" in value or "\\" in value or value.startswith("."):
        # Concept names become file names inside the output folder; never let one escape it.
        raise ValueError(f"{what} {value!r} would not be a safe file name (no '/', '\\' or leading '.')")
    return value


def fill_template(template: str, word: str) -> str:
    """template.format(word), with "a {}" becoming "an {}" before a vowel ("a photo of an axe")."""
    if word[:1].lower() in "aeiou" and "a {}" in template:
        template = template.replace("a {}", "an {}")
    return template.format(word)


def parse_overrides(items: list[str], names: list[str], kind: str, example: str) -> dict[str, dict[str, Any]]:
    """Command-line `--set NAME.FIELD=VALUE` items as {name: {field: value}} (values are YAML: true,
    0.01, [a, b]); each name must be one of `names` (the methods or attacks being run)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, field = key.strip().partition(".")
        if not (sep and dot and field):
            raise ValueError(f"--set {item!r}: expected {kind.upper()}.FIELD=VALUE, e.g. {example}")
        if name not in names:
            raise ValueError(f"--set {item!r}: {name!r} is not among the {kind}s run ({', '.join(names)})")
        out.setdefault(name, {})[field] = yaml.safe_load(value)
    return out


class Concept(_Strict):
    """One concept to forget and the superclass it is mapped onto (tench -> fish)."""

    name: str
    superclass: str
    prompts: list[str] | None = Field(
        default=None, description="Prompts that name the concept; default: the run's prompt template."
    )
    synonyms: list[str] = Field(default_factory=list, description="Other words for it, trained on too.")
    members: list[str] = Field(
        default_factory=list,
        description="For a family ('weapon'): the classes or words it covers (dagger, axe, ...). Trained on "
                    "like synonyms; the evaluation measures each member as erased and never counts one as kept.",
    )
    negative_prompt: str | None = Field(
        default=None,
        description="Negative prompt for the superclass images. Default: the measured anchor rule "
        "(sculpt.data.anchors): the concept's name, so the anchor images do not show the concept (the "
        "paper), unless the model's judge finds that it leaves fewer than half of them in the superclass; "
        "then none. A value here is used as given ('' for none).",
    )
    neighbours: list[str] | None = Field(
        default=None,
        description="Concepts to keep that are close to this one (methods with neighbour-aware "
        "preservation distil the model on their prompts and images). Default: the method's number of "
        "nearest classes in the model's text-encoder space, from the run's vocabulary; [] for none.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "concept name")

    @field_validator("superclass")
    @classmethod
    def _superclass(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("superclass is empty")
        return v

    @field_validator("prompts", "synonyms", "members", "neighbours")
    @classmethod
    def _no_empty_prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not p.strip() for p in v):
            raise ValueError("contains an empty prompt")
        return v

    @model_validator(mode="after")
    def _not_its_own_superclass(self) -> "Concept":
        if self.name.casefold() == self.superclass.casefold():
            raise ValueError(f"a concept cannot be its own superclass ({self.name!r})")
        return self

    @property
    def words(self) -> list[str]:
        """Every word that names the concept: its name, synonyms and members, each once."""
        return list(dict.fromkeys([self.name, *self.synonyms, *self.members]))

    def concept_prompts(self, template: str) -> list[str]:
        """Prompts used to generate the concept's images and to train its forgetting: its own, then
        one per synonym and per member (a member that is also a synonym once)."""
        base = self.prompts or [fill_template(template, self.name)]
        return base + [fill_template(template, w) for w in self.words[1:]]

    def superclass_prompt(self, template: str) -> str:
        return fill_template(template, self.superclass)

    def superclass_negative(self) -> str:
        """The paper's negative prompt for the anchor images (the measured rule may drop it)."""
        return self.negative_prompt if self.negative_prompt is not None else self.name


class DataConfig(_Strict):
    """Self-generated training data: N images per concept and per superclass, made by the model."""

    n_images: int = Field(100, ge=1, description="Images per concept and per superclass (paper: 100).")
    resolution: int | None = Field(None, description="Pixels; default: the model's own sample size.")
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    prompt_template: str = Field("a photo of a {}", description="Used for concepts without prompts.")
    batch_size: int = Field(8, ge=1, description="Images generated per pipeline call.")
    neighbour_images: int = Field(16, ge=1, description="Images per neighbour kept (neighbour-aware methods).")
    neighbour_similarity: Literal["tokens", "pooled", "predictions"] = Field(
        "tokens", description="How neighbours are ranked (sculpt.data.neighbours): the token states as "
        "cross-attention reads them, their pooled mean, or the UNet's guidance directions.")
    vocabulary: str | None = Field(
        None, description="File of candidate neighbours, one per line; default: the emoji world's classes, "
        "else the list shipped with sculpt (sculpt/data/vocabulary.txt).")
    cache_dir: str | None = Field(None, description="Default: $SCULPT_CACHE or ~/.cache/sculpt.")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if v.count("{}") != 1:
            raise ValueError("prompt_template must contain exactly one '{}'")
        return v


class TrainConfig(_Strict):
    """How the optimisation runs (the method's own hyperparameters live in `method`)."""

    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    checkpoint_every_s: float = Field(
        300.0, ge=0, description="Seconds between mid-stage checkpoints (the paper's method; 0: after every "
        "step). A run killed mid-stage resumes from the last one; results do not depend on this setting.")


class CheckConfig(_Strict):
    """When a stage counts as done: its concepts no longer drawn (sculpt.presence)."""

    enabled: bool = Field(True, description="check after each stage that its concepts are gone")
    pictures: int = Field(32, ge=1, description="pictures per check (check seeds, disjoint from evaluation's)")
    max_share: float = Field(0.05, ge=0, le=1, description="gone: at most this share of them show the concept")
    max_rounds: int = Field(4, ge=0, description="extra training rounds at most (methods that can go on)")
    round_epochs: int = Field(1, ge=1, description="epochs of the method's schedule per extra round")


class RunConfig(_Strict):
    """A whole erasure run: model, concepts in order, mode, method and its settings."""

    model: str = Field(description="'emoji', a local diffusers folder, a Hub id or a .safetensors file.")
    output: str | None = Field(None, description="Output folder; default: runs/<spec file name>.")
    patches: list[str] = Field(
        default_factory=list,
        description="Patches applied to the model before this run (stacking runs), in the order they were "
                    "made. The run goes on as one run over their concepts and this spec's would: it starts from "
                    "their weights and from the method state the last one carries (the freeze mask), keeps "
                    "distilling the concepts they erased, and makes its training data with the model before "
                    "the patches.",
    )
    mode: Literal["sequential", "simultaneous"] = "sequential"
    unprotected: list[str] = Field(
        default_factory=list,
        description="Classes no neighbour set of this run may hold: kept by no method, so their accuracy "
                    "shows the damage nobody guarded against (the lists file's unprotected siblings).",
    )
    seed: int = 0
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "sculpting"})
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)
    concepts: list[Concept] = Field(min_length=1)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"name": v}
        if isinstance(v, dict) and "name" not in v:
            return {"name": "sculpting", **v}
        return v

    @field_validator("method")
    @classmethod
    def _method_known(cls, v: dict[str, Any]) -> dict[str, Any]:
        from sculpt.methods import get_method

        get_method(v["name"]).config_class(**{k: x for k, x in v.items() if k != "name"})
        return v

    @field_validator("concepts")
    @classmethod
    def _unique(cls, v: list[Concept]) -> list[Concept]:
        seen: dict[str, int] = {}
        for i, c in enumerate(v):
            key = c.name.casefold()
            if key in seen:
                raise ValueError(f"concept {c.name!r} is listed twice (entries {seen[key]} and {i})")
            seen[key] = i
        return v

    @property
    def method_name(self) -> str:
        return self.method["name"]

    def method_config(self):
        from sculpt.methods import get_method

        args = {k: x for k, x in self.method.items() if k != "name"}
        return get_method(self.method_name).config_class(**args)

    def stages(self) -> list[list[Concept]]:
        """Sequential: one concept per stage, in order. Simultaneous: all concepts in one stage."""
        if self.mode == "sequential":
            return [[c] for c in self.concepts]
        return [list(self.concepts)]


# -- loading with line numbers ---------------------------------------------------------------------


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each key path (e.g. ('concepts', 2, 'superclass')) to its 1-based YAML line."""
    out = {} if out is None else out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[path + (key,)] = k.start_mark.line + 1
            _line_map(v, path + (key,), out)
            out[path + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, path + (i,), out)
    return out


def _format_errors(err: ValidationError, source: str, lines: dict[tuple, int]) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(e["loc"])
        line = None
        for n in range(len(loc), -1, -1):  # the deepest path the YAML actually has
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        field = ".".join(str(x) for x in loc) or "(top level)"
        text = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            text = f"unknown field {loc[-1]!r}"
        msgs.append(f"{source}:{line if line else '?'}: {field}: {text}")
    return "\n".join(msgs)


def parse_spec(text: str, source: str = "<spec>") -> RunConfig:
    """Parse and validate a YAML spec; raise SpecError naming each bad field and its line."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a mapping with 'model' and 'concepts'")
    try:
        return RunConfig(**data)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc, source, _line_map(node))) from None


def load_spec(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such spec file")
    cfg = parse_spec(path.read_text(encoding="utf-8"), str(path))
    if cfg.output is None:
        cfg.output = str(Path("runs") / path.stem)
    return cfg
