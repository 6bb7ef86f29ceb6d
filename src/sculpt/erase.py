"""The shared erasure loop: load the model, make the data, run the method stage by stage, save
patches. Every method (the paper's and the baselines) runs through here.

Output folder:
    config.yaml            the resolved spec
    erase.log              human-readable log
    metrics.jsonl          one line per optimisation step (loss terms, mask density, turnover)
    stages/NN-<concept>.safetensors   cumulative patch after stage NN
    patch.safetensors      the final patch (== the last stage's)
    checkpoint.safetensors the state after the last completed stage (resume point)
    stage-progress.safetensors  the state inside the current stage, every train.checkpoint_every_s
                           (methods that support it: the paper's); removed when the stage completes
    ledger.jsonl           hash-chained audit record (see ledger.py)
    summary.json           per-stage summary: timings, best epoch, hashes

Running `erase` again on the same output folder resumes after the last completed stage and
reaches the same weights as an uninterrupted run (bit-identical on CPU): each stage depends only
on the weights and method state it starts from, its data (cached) and its own seed.

A run stacked on earlier patches (`patches:`) goes on as one run over all the concepts would: it
starts from their weights and from the method state the last one carries (the freeze mask), keeps
distilling every concept they erased, numbers its stage seeds after theirs, and makes all training
data with the model as loaded, before any patch (so the same spec and seed give the same patch as
the second half of one run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from sculpt import ledger
from sculpt.config import Concept, DataConfig, RunConfig
from sculpt.data.anchors import default_judge
from sculpt.data.neighbours import default_siblings, default_vocabulary, drop_lookalikes, run_neighbours
from sculpt.presence import default_check
from sculpt.data.prepare import (ConceptData, check_image_size, encode_unconditional, image_size, prepare_concept_data,
                                 prepare_neighbours)
from sculpt.io import atomic_write, atomic_write_text
from sculpt.methods import get_method
from sculpt.model_card import write_model_card
from sculpt.models.loading import load_pipeline, model_hash, resolve_device
from sculpt.patch import Patch, PatchError, apply_patch, check_fits, load_patch, make_patch, save_patch, versions
from sculpt.paths import default_cache_dir, slug
from sculpt.processes import current as current_processes
from sculpt.progress import Progress
from sculpt.stage import LossDivergedError, StageContext, StopRequested

log = logging.getLogger("sculpt")
CHECKPOINT_FORMAT = "sculpt-checkpoint/1"


class RunError(RuntimeError):
    """The run cannot start or go on (locked folder, different spec in the folder, failed stage)."""


@dataclass
class Stack:
    """What the patches a run starts on carry forward (see the module docstring)."""

    patches: list[Patch]
    erased: list[dict[str, Any]]  # {"concept": spec, "data": DataConfig, "seed": int}, in the order erased
    stages: int  # stages behind the last patch
    method: str | None  # the method whose state the last patch carries
    method_state: dict[str, torch.Tensor]

    @property
    def concepts(self) -> list[Concept]:
        return [Concept(**e["concept"]) for e in self.erased]


def read_stack(pipe, paths: list[str], model_hash_: str) -> Stack:
    """Load the patches and check, without applying them, that they fit this model in this order."""
    patches, expected = [], model_hash_
    for path in paths:
        patch = load_patch(path)
        base = patch.metadata.get("base_hash")
        if base is not None and base != expected:
            raise PatchError(f"{path}: made on another model (base hash {base[:16]}..., expected {expected[:16]}...; "
                             "list the patches in the order they were made)")
        check_fits(pipe, patch)
        expected = patch.metadata.get("result_hash", expected)
        patches.append(patch)
    last = patches[-1].metadata if patches else {}
    return Stack(patches, list(last.get("erased", [])), int(last.get("stages_total", 0)), last.get("method"),
                 patches[-1].method_state if patches else {})


@dataclass
class EraseResult:
    output: Path
    patch_path: Path
    patch: Patch
    stages: list[dict[str, Any]]
    pipe: Any
    main_process: bool = True  # False in the other processes of an `accelerate launch` run


def config_hash(cfg: RunConfig) -> str:
    """Identity of a run's spec (everything but where it is written and how often it checkpoints)."""
    body = cfg.model_dump(mode="json", exclude={"output": True, "train": {"checkpoint_every_s"}})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    device = resolve_device(cfg.train.device)
    state = AcceleratorState._shared_state
    if state and PartialState().num_processes == 1 and (
        state.get("_mixed_precision") != cfg.train.mixed_precision or PartialState().device.type != device.type
    ):
        # accelerate keeps one global state per process; a single-process caller (a notebook, the
        # test suite, `sculpt bench`) may run erasures with different precisions one after another.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=device.type == "cpu")


# -- one run per folder ----------------------------------------------------------------------------


@contextmanager
def run_lock(out: Path):
    """Refuse a second `erase` on the same folder while one runs (a stale lock of a dead pid is taken over)."""
    lock = out / ".lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise RunError(f"{out} is in use by another sculpt erase (pid {pid}); wait for it or use another output")
            lock.unlink(missing_ok=True)  # stale: its process is gone
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def graceful_interrupt(state: dict):
    """Ctrl-C sets a flag: the method finishes its current step, then stops at the step boundary."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if state.get("stop"):
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        state["stop"] = True
        log.warning("interrupt: finishing the current step, then stopping")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# -- checkpoints -----------------------------------------------------------------------------------


def save_checkpoint(out: Path, tensors: dict[str, torch.Tensor], method_state: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> Path:
    path = out / "checkpoint.safetensors"
    t = {**{f"unet.{k.removeprefix('unet.')}": v for k, v in tensors.items()},
         **{f"method.{k}": v.contiguous() for k, v in method_state.items()}}
    atomic_write(path, lambda tmp: save_file(t, tmp, metadata={
        "sculpt": json.dumps({"format": CHECKPOINT_FORMAT, **meta}, default=str)}))
    return path


PROGRESS = "stage-progress.safetensors"


def save_progress(out: Path, stage: int, cfg_hash: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """A method's state inside stage `stage` (0-based), written atomically beside the checkpoint."""
    body = json.dumps({"format": CHECKPOINT_FORMAT, "stage": stage, "config_hash": cfg_hash, **meta})
    atomic_write(out / PROGRESS, lambda tmp: save_file(tensors, tmp, metadata={"sculpt": body}))


def load_progress(out: Path) -> tuple[dict, dict] | None:
    path = out / PROGRESS
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["sculpt"])
        tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise RunError(f"{path}: unreadable mid-stage checkpoint ({exc}); move it away to restart the stage") from None
    return tensors, meta


def load_checkpoint(out: Path) -> tuple[dict, dict, dict] | None:
    path = out / "checkpoint.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["sculpt"])
        t = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
        raise RunError(f"{path}: unreadable checkpoint ({exc}); move it away to start the run afresh") from None
    model = {k: v for k, v in t.items() if k.startswith("unet.")}
    method = {k.removeprefix("method."): v for k, v in t.items() if k.startswith("method.")}
    return model, method, meta


# -- the loop --------------------------------------------------------------------------------------


def erase(cfg: RunConfig, pipe=None, progress: bool = True) -> EraseResult:
    """Run the spec: forget cfg.concepts stage by stage with cfg.method; return the final patch.

    Resumes a run already in cfg.output; refuses a folder that holds a different spec."""
    out = Path(cfg.output or "runs/erase")
    existing = load_checkpoint(out) if out.is_dir() else None
    mid_stage = load_progress(out) if out.is_dir() else None
    if any(found and found[-1].get("config_hash") != config_hash(cfg) for found in (existing, mid_stage)):
        raise RunError(f"{out} holds a run of a different spec; choose another output folder")
    accelerator = make_accelerator(cfg)
    # Load (and check) everything before the output folder is touched: a bad model or patch
    # leaves nothing behind.
    if pipe is None:
        pipe = load_pipeline(cfg.model, device=accelerator.device)
    else:
        pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    origin_hash = model_hash(pipe)
    stack = read_stack(pipe, cfg.patches, origin_hash)
    if cfg.patches and not stack.erased:
        log.warning("the patches carry no list of erased concepts (made before sculpt-patch/2 or by hand): "
                    "their concepts are not distilled in this run")
    again = {c.name.casefold() for c in stack.concepts} & {c.name.casefold() for c in cfg.concepts}
    if again:
        raise RunError(f"already erased by the patches this run starts on: {', '.join(sorted(again))}; "
                       "remove them from the spec")
    check_image_size(pipe, image_size(pipe, cfg.data))
    # With several processes (`accelerate launch`) the main one owns the folder: its lock, its log,
    # every file and ledger entry; the others train beside it.
    main = accelerator.is_main_process
    if main:
        (out / "stages").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "erase.log") if main else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with run_lock(out) if main else nullcontext():
            return _erase(cfg, out, pipe, accelerator, existing, mid_stage, progress, stack, origin_hash)
    finally:
        log.removeHandler(handler)
        handler.close()


def neighbour_rule(cfg: RunConfig, k: int, siblings: bool) -> dict[str, Any]:
    """Everything a concept's neighbour list follows from, besides what the run erases: recorded with
    each erased concept in the patch, so a run stacked on it recomputes that concept's list by its own
    run's rule (and erases both lists' concepts from it), as one run over both lists would."""
    return {"k": k, "siblings": siblings, "vocabulary": default_vocabulary(cfg.model, cfg.data.vocabulary),
            "template": cfg.data.prompt_template, "held_out": list(cfg.unprotected),
            "similarity": cfg.data.neighbour_similarity}


def _neighbours(pipe, cfg: RunConfig, stack: Stack, every: list, k: int, siblings: bool) -> dict[str, list]:
    """Each erased concept's neighbours to keep. A concept carried from the patches follows its own
    run's rule (k, vocabulary, siblings, template, held-out classes: recorded in the patch); only
    patches written before the rule was recorded get this run's. Nothing erased by either is kept."""
    from sculpt.data.wordnet import WordNet, find_wordnet

    ours = neighbour_rule(cfg, k, siblings)
    rules = {c.name: e.get("neighbour_rule") for c, e in zip(stack.concepts, stack.erased)}
    old = [n for n, r in rules.items() if r is None]
    if old:
        log.warning("the patches do not record the neighbour rule of %s: this run's is used", ", ".join(old))
    root = find_wordnet()
    wordnet = WordNet(root) if root is not None else None
    taxonomy_siblings = default_siblings(cfg.model)
    out = {}
    try:
        for c in every:
            rule = rules.get(c.name) or ours
            if not (rule["k"] or rule["siblings"]):
                out[c.name] = []
                continue
            out.update(run_neighbours(pipe, [c], every, rule["k"], rule["vocabulary"], rule["template"],
                                      taxonomy_siblings if rule["siblings"] else None,
                                      held_out=rule["held_out"], wordnet=wordnet,
                                      how=rule.get("similarity", "tokens")))
    finally:
        if wordnet is not None:
            wordnet.close()
    return out


def _stage_neighbours(neighbours: dict[str, list], erased_so_far: list[str]) -> list[str]:
    """A stage keeps the neighbours of every concept erased so far (this stage's included), each once."""
    return list(dict.fromkeys(w for n in erased_so_far for w, _ in neighbours.get(n, [])))


def _erase(cfg: RunConfig, out: Path, pipe, accelerator, existing, mid_stage, progress: bool, stack: Stack,
           origin_hash: str) -> EraseResult:
    torch.manual_seed(cfg.seed)
    # Data for every concept, the carried ones included, made once by the model as loaded (with several
    # processes each draws its share of the pictures; the main process writes the cache).
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir() / "data"
    t0 = time.perf_counter()
    data: dict[str, ConceptData] = {}
    jobs = [(c, DataConfig(**e["data"]), e["seed"]) for c, e in zip(stack.concepts, stack.erased)]
    every = [*stack.concepts, *cfg.concepts]
    judge = default_judge(cfg.model) if any(c.negative_prompt is None for c in every) else None
    method = get_method(cfg.method_name)(cfg.method_config())
    k, siblings = method.neighbours_wanted(), method.keeps_siblings()
    processes = current_processes()
    for c, data_cfg, seed in [*jobs, *((c, cfg.data, cfg.seed) for c in cfg.concepts)]:
        data[c.name] = prepare_concept_data(pipe, c, data_cfg, seed, cache, origin_hash,
                                            progress=progress and accelerator.is_main_process, judge=judge,
                                            processes=processes)
    # Neighbour-aware methods: the concepts to keep near each erased one, with their images.
    neighbours = _neighbours(pipe, cfg, stack, every, k, siblings)
    neighbours = neighbours if any(neighbours.values()) or k or siblings else {}
    neighbour_data = prepare_neighbours(pipe, [w for ws in neighbours.values() for w, _ in ws], cfg.data,
                                        cfg.seed, cache, origin_hash, progress and accelerator.is_main_process,
                                        processes)
    lookalikes = drop_lookalikes(pipe, neighbours, every, neighbour_data, cfg.data.prompt_template,
                                 {c.name for c in every if c.neighbours is not None})
    for name, words in lookalikes.items():
        log.info("%s: not kept, the model reads their pictures as it: %s", name,
                 ", ".join(f"{w} ({v:.0%})" for w, v in words))
    for c in every:
        log.info("%s: anchor %s", c.name, data[c.name].anchor.get("how", "?"))
        if neighbours:
            log.info("%s: neighbours kept %s", c.name, ", ".join(w for w, _ in neighbours[c.name]) or "none")
    empty = encode_unconditional(pipe)
    log.info("data ready in %.1fs (cache %s)", time.perf_counter() - t0, cache)
    presence = default_check(cfg.model, cfg.check) if cfg.check.enabled else None

    for patch in stack.patches:  # their chain was checked by read_stack: the result is hashed once
        apply_patch(pipe, patch, check_hash=False)
    base_hash = model_hash(pipe) if stack.patches else origin_hash
    recorded = stack.patches[-1].metadata.get("result_hash") if stack.patches else None
    if recorded is not None and recorded != base_hash:
        raise PatchError(f"the patches give a model with hash {base_hash[:16]}..., their last one recorded "
                         f"{recorded[:16]}... (a patch file was changed after it was written?)")
    if stack.method_state and stack.method == method.name:
        method.load_state_dict(stack.method_state)
    elif stack.method_state:
        log.warning("the last patch carries the state of method %s, not %s: this run starts without it",
                    stack.method, method.name)
    if stack.patches:
        log.info("stacked on %d patch(es): %d earlier stage(s), distilling %s", len(stack.patches), stack.stages,
                 ", ".join(c.name for c in stack.concepts) or "nothing")
    trainable = method.trainable_parameters(pipe.unet)
    base = {n: p.detach().to("cpu").clone() for n, p in trainable.items()}
    stages = cfg.stages()
    done_stages, summaries = 0, []
    if existing:
        model_t, method_t, meta = existing
        if meta["base_hash"] != base_hash:
            raise RunError(f"{out}: its checkpoint was made on another model (hash {meta['base_hash'][:16]}..., "
                           f"model {base_hash[:16]}...)")
        with torch.no_grad():
            params = dict(pipe.unet.named_parameters())
            for k, v in model_t.items():
                params[k.removeprefix("unet.")].copy_(v)
        method.load_state_dict(method_t)
        done_stages, summaries = meta["completed_stages"], meta["summaries"]
    if mid_stage is not None and mid_stage[1]["stage"] != done_stages:
        mid_stage = None  # saved in a stage that has completed since
    if existing or mid_stage:
        if accelerator.is_main_process:  # the steps of the unfinished stage after its last saved state go
            _drop_metrics_after(out / "metrics.jsonl", done_stages, mid_stage[1]["step"] if mid_stage else 0)
        log.info("resuming %s after stage %d of %d%s", out, done_stages, len(stages),
                 f", inside stage {done_stages + 1} at step {mid_stage[1]['step']}" if mid_stage else "")
    elif accelerator.is_main_process:
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        (out / "metrics.jsonl").write_text("")
        ledger.append(out / "ledger.jsonl", "run", base_model=cfg.model, base_hash=base_hash,
                      config=cfg.model_dump(mode="json"), config_hash=config_hash(cfg), versions=versions(),
                      **({"stacked_on": {"origin_hash": origin_hash, "concepts": [c.name for c in stack.concepts],
                                         "stages": stack.stages}} if stack.patches else {}))
    log.info("model %s (hash %s), method %s, %d concepts, mode %s",
             cfg.model, base_hash[:16], method.name, len(cfg.concepts), cfg.mode)

    carried = [c.name for c in stack.concepts]
    done = [c.name for stage in stages[:done_stages] for c in stage]
    specs = {c.name: c for c in [*stack.concepts, *cfg.concepts]}
    erased_before = {e["concept"]["name"]: e for e in stack.erased}
    patch = make_patch(pipe.unet, base, {})
    stop = {"stop": False}
    for i in range(done_stages, len(stages)):
        names = [c.name for c in stages[i]]
        bar = _progress_bar(progress and accelerator.is_main_process, i, names, method)
        ctx = StageContext(
            pipe=pipe, accelerator=accelerator, index=i,
            concepts=[data[n] for n in names], previous=[data[n] for n in carried + done],
            neighbours=[neighbour_data[w] for w in _stage_neighbours(neighbours, carried + done + names)],
            seed=cfg.seed + 1000 * (stack.stages + i), log_file=out / "metrics.jsonl", empty_embeds=empty,
            on_step=bar.update_record if bar else None, stop_flag=stop,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            resume=mid_stage if i == done_stages else None, checkpoint_every_s=cfg.train.checkpoint_every_s,
            save_progress=(lambda tensors, meta, i=i: save_progress(out, i, config_hash(cfg), tensors, meta))
            if accelerator.is_main_process else None,
            check=cfg.check, presence=presence, template=cfg.data.prompt_template,
        )
        start = {n: p.detach().clone() for n, p in trainable.items()}  # the last good state
        t_stage = time.perf_counter()
        try:
            with graceful_interrupt(stop):
                summary = method.fit_stage(ctx)
        except (LossDivergedError, StopRequested, KeyboardInterrupt) as exc:
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(start[n])
            ctx.finish_training()
            if bar:
                bar.close()
            what = "interrupted" if not isinstance(exc, LossDivergedError) else f"stopped: {exc}"
            ledger.append(out / "ledger.jsonl", "stage_stopped", stage=i + 1, concepts=names, reason=what)
            raise RunError(f"stage {i + 1} ({', '.join(names)}) {what}; the model is kept as after stage {i} "
                           f"({out / 'checkpoint.safetensors' if i else 'the base model'}); "
                           "run the same command again to resume") from exc
        if ctx.presence_check is not None and "check" not in summary:  # a method that cannot go on: say so
            summary["check"] = ctx.check_summary([ctx.presence_check()])
        if "check" in summary and not summary["check"]["gone"]:
            log.warning("stage %d: still drawn after %d extra round(s): %s (share of %d check pictures: %s); "
                        "the run goes on, and its summary, ledger and model card say so", i + 1,
                        summary["check"]["extra_rounds"], ", ".join(summary["check"]["remaining"]),
                        cfg.check.pictures, summary["check"]["shares"][-1])
        seconds = time.perf_counter() - t_stage
        if bar:
            bar.close()
        _check_processes_agree(accelerator, trainable, method, i + 1)
        done += names
        result_hash = model_hash(pipe)
        patch = make_patch(pipe.unet, base, {
            "base_model": cfg.model, "base_hash": base_hash, "result_hash": result_hash,
            "method": method.name, "method_config": method.config.model_dump(mode="json"),
            "concepts": done, "superclasses": {c.name: c.superclass for c in cfg.concepts if c.name in done},
            "mode": cfg.mode, "seed": cfg.seed, "data": cfg.data.model_dump(mode="json"),
            "data_keys": {n: data[n].key for n in done}, "stage": i + 1, "versions": versions(),
            "stages_total": stack.stages + i + 1,
            "erased": [erased_before.get(n) or {"concept": specs[n].model_dump(mode="json"),
                                                "data": cfg.data.model_dump(mode="json"), "seed": cfg.seed,
                                                "neighbour_rule": neighbour_rule(cfg, k, siblings),
                                                "neighbours": [w for w, _ in neighbours.get(n, [])]}
                       for n in carried + done],
        }, method_state=method.state_dict())
        stage_path = out / "stages" / f"{i + 1:02d}-{slug('+'.join(names))}.safetensors"
        summaries.append({"stage": i + 1, "concepts": names, "seconds": round(seconds, 3),
                          "patch": str(stage_path.relative_to(out)), **summary})
        if accelerator.is_main_process:
            save_patch(patch, stage_path)
            ckpt = save_checkpoint(out, patch.tensors, method.state_dict(), {
                "completed_stages": i + 1, "config_hash": config_hash(cfg), "base_hash": base_hash,
                "result_hash": result_hash, "summaries": summaries})
            ledger.append(
                out / "ledger.jsonl", "stage", stage=i + 1, concepts=names,
                superclasses={c.name: c.superclass for c in stages[i]}, method=method.name,
                base_hash=base_hash, result_hash=result_hash, data_keys={n: data[n].key for n in names},
                anchors={n: data[n].anchor for n in names},
                **({"neighbours_dropped_as_lookalikes": {n: lookalikes[n] for n in names if n in lookalikes}}
                   if any(n in lookalikes for n in names) else {}),
                **({"neighbours": {n: [[w, None if v is None else round(v, 4)] for w, v in neighbours[n]] for n in names},
                    "neighbour_data_keys": {w: neighbour_data[w].key
                                            for w in _stage_neighbours(neighbours, carried + done + names)}}
                   if neighbours else {}),
                seconds=round(seconds, 3), summary=summary, versions=versions(),
                # the stage patch never changes again; the checkpoint is replaced by the next stage
                files={str(stage_path.relative_to(out)): ledger.file_sha256(stage_path)},
                checkpoint_sha256=ledger.file_sha256(ckpt),
            )
            (out / PROGRESS).unlink(missing_ok=True)  # the stage is complete: its checkpoint supersedes it
        log.info("stage %d %s done in %.1fs: %s", i + 1, names, seconds, summary)

    patch_path = out / "patch.safetensors"
    if accelerator.is_main_process and done_stages < len(stages):
        save_patch(patch, patch_path)
        ledger.append(out / "ledger.jsonl", "final", concepts=done, base_hash=base_hash,
                      result_hash=patch.metadata.get("result_hash"),
                      files={patch_path.name: ledger.file_sha256(patch_path)},
                      **({"still_drawn": remaining_concepts(summaries)} if cfg.check.enabled else {}))
        atomic_write_text(out / "summary.json", json.dumps(
            {"base_model": cfg.model, "base_hash": base_hash, "method": method.name,
             "stages": summaries, "patch": patch_path.name, "patch_bytes": patch.nbytes(),
             "still_drawn": remaining_concepts(summaries)}, indent=2))
        write_model_card(out)
    if done_stages == len(stages):
        patch = load_patch(patch_path)
        log.info("%s: the run was already complete", out)
    return EraseResult(out, patch_path, patch, summaries, pipe, accelerator.is_main_process)


def remaining_concepts(summaries: list[dict[str, Any]]) -> list[str]:
    """The concepts whose stage ended with the presence check still finding them (sculpt.presence)."""
    return [c for s in summaries for c in s.get("check", {}).get("remaining", [])]


def _check_processes_agree(accelerator, trainable: dict[str, torch.Tensor], method, stage: int) -> None:
    """Several processes must end a stage on the same weights and method state (they average their
    gradients, so the mask and the best epoch agree): compare a checksum of both across processes."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        parts = [p.detach().double().sum().reshape(1) for p in trainable.values()]
        parts += [m.double().sum().reshape(1) for m in method.state_dict().values()]
        mine = torch.cat(parts).to(accelerator.device)
    every = accelerator.gather(mine.unsqueeze(0))
    if not all(torch.equal(every[0], row) for row in every):
        raise RunError(f"stage {stage}: the {accelerator.num_processes} processes ended on different weights or "
                       "method state; nothing of this stage is saved")


def _drop_metrics_after(path: Path, completed: int, steps_kept: int = 0) -> None:
    """Keep the records of the completed stages and the first `steps_kept` steps of the next one."""
    if path.is_file():
        records = [(line, json.loads(line)) for line in path.read_text().splitlines() if line]
        keep = [line for line, r in records
                if r["stage"] < completed or (r["stage"] == completed and r.get("step", 0) <= steps_kept)]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


class _StageProgress:
    """A stage's progress (sculpt.progress): steps done, with the loss terms, mask density and turnover
    of the latest step; on a terminal a bar, otherwise one line when the stage ends."""

    SHOWN = ("L_f", "L_a", "L_kd", "loss", "density", "turnover")

    def __init__(self, index: int, names: list[str], method):
        self.bar = Progress(f"stage {index + 1}: {', '.join(names)}", total=method.steps_per_stage() or None,
                            unit="step")

    def update_record(self, record: dict[str, Any]) -> None:
        self.bar.set_postfix({k: f"{record[k]:.3g}" for k in self.SHOWN if k in record})
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _progress_bar(enabled: bool, index: int, names: list[str], method) -> _StageProgress | None:
    return _StageProgress(index, names, method) if enabled else None
