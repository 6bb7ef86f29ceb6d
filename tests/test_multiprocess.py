"""Several processes, one run: `accelerate launch` with two CPU processes (gloo) erases like one process
would (global batch split, gradients averaged, the same mask and best epoch everywhere) and only the
main process writes the folder. Data generation and evaluation share their sampling between the
processes and give a one-process run's pictures, bit for bit."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sculpt.erase import RunError, _check_processes_agree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(tmp_path) -> Path:
    if not (tmp_path / "model").is_dir():
        from sculpt.models.tiny import tiny_pipeline

        tiny_pipeline(seed=0).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _spec(tmp_path, name: str, steps: int = 6, train: str = "", batch_size: int = 4, cache: str = "cache") -> Path:
    _model(tmp_path)
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"""\
model: {tmp_path / 'model'}
output: {tmp_path / name}
method: {{name: sculpting, lr: 1.0e-3, epochs: 2, steps_per_epoch: {steps}, warmup_steps: 2, mask_update_every: 4}}
concepts:
  - {{name: cat, superclass: animal}}
  - {{name: car, superclass: vehicle, synonyms: [automobile]}}
data: {{n_images: 4, num_inference_steps: 2, batch_size: {batch_size}, cache_dir: {tmp_path / cache}}}
check: {{enabled: false}}
{train}""")
    return spec


def _launch(tmp_path, spec: Path | list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    """`accelerate launch` of `sculpt erase SPEC`, or of the given script and arguments."""
    launcher = Path(sys.executable).parent / "accelerate"
    command = ["-m", "sculpt.cli", "erase", str(spec)] if isinstance(spec, Path) else spec
    # On a machine without GPUs, --multi_gpu is what makes accelerate start torchrun; the processes
    # then find no CUDA and join over gloo on the CPU.
    return subprocess.Popen([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                             str(_free_port()), *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"PATH": str(launcher.parent), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                 "SCULPT_PROGRESS": "lines", "HOME": str(tmp_path), **(env or {})}, **popen)


def test_two_processes_under_accelerate_launch_make_one_run(tmp_path):
    p = _launch(tmp_path, _spec(tmp_path, "run"))
    out, err = p.communicate(timeout=600)
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("patch:") == 1  # the main process reports; the other one is silent
    run = tmp_path / "run"
    events = [json.loads(line)["event"] for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert events == ["run", "stage", "stage", "final"]  # one writer
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 * 12 and [s["step"] for s in steps[:12]] == list(range(1, 13))
    # The one-cycle LR schedule advances once per optimiser step, not once per process and step.
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=12, anneal_strategy="cos")
    expected = []
    for _ in range(12):
        opt.step()
        sched.step()
        expected.append(sched.get_last_lr()[0])
    assert [s["lr"] for s in steps[:12]] == pytest.approx(expected)
    summary = json.loads((run / "summary.json").read_text())
    assert [s["concepts"] for s in summary["stages"]] == [["cat"], ["car"]]
    # (Every stage ended with a cross-process check that weights and freeze mask agree: see below.)


class _Accelerator:
    """Two processes' worth of gather, without processes."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other):
        self.other = other

    def gather(self, t):
        return torch.cat([t, self.other(t)])


def test_processes_that_end_a_stage_apart_are_stopped():
    weights = {"w": torch.ones(3)}

    class Method:
        def state_dict(self):
            return {"frozen.w": torch.tensor([True, False, False])}

    _check_processes_agree(_Accelerator(lambda t: t.clone()), weights, Method(), 1)  # agree: nothing said
    with pytest.raises(RunError, match="different weights"):
        _check_processes_agree(_Accelerator(lambda t: t + 1e-6), weights, Method(), 1)


def test_two_processes_killed_inside_a_stage_resume_bit_for_bit(tmp_path):
    """kill -9 of both processes inside stage 1; the same launch again goes on from the saved step,
    each process with its own random state, and ends on the weights of an uninterrupted run."""
    import os
    import signal
    import time

    from safetensors.torch import load_file

    from sculpt.erase import PROGRESS, load_progress

    ref = _launch(tmp_path, _spec(tmp_path, "ref", steps=10))
    assert ref.wait(timeout=600) == 0, ref.communicate()[1][-3000:]
    spec = _spec(tmp_path, "run", steps=10, train="train: {checkpoint_every_s: 0}\n")
    p = _launch(tmp_path, spec, start_new_session=True)
    run, deadline, at = tmp_path / "run", time.time() + 300, -1
    while at < 6 and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
        try:
            at = load_progress(run)[1]["step"] if (run / PROGRESS).exists() else -1
        except Exception:  # noqa: BLE001 - being replaced
            at = -1
    assert p.poll() is None, "the run ended before it could be killed"
    # the launcher and both workers (torchrun gives them their own process groups): all by the spec path
    subprocess.run(["pkill", "-9", "-f", str(spec)], check=False)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    while subprocess.run(["pgrep", "-f", str(spec)], capture_output=True).returncode == 0:
        time.sleep(0.1)
    saved = load_progress(run)
    assert saved[1]["stage"] == 0 and saved[1]["step"] < 20  # inside stage 1
    assert len(saved[1]["walks_by_rank"]) == 2 and "generator/1" in saved[0]
    p = _launch(tmp_path, spec)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert f"inside stage 1 at step {saved[1]['step']}" in (run / "erase.log").read_text()
    a, b = load_file(str(tmp_path / "ref" / "patch.safetensors")), load_file(str(run / "patch.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- sampling shared between the processes -----------------------------------------------------------

# `sculpt` as the launch runs it, writing to COUNTS/<rank> the number of pictures this process drew
# (every picture goes through sampling.denoise) and, for erase, the anchor pictures each concept's data
# holds in this process; the anchor rule's judge is ScriptedJudge.
COUNTING = """
import json, os, sys
from pathlib import Path

sys.path.insert(0, {tests!r})
import sculpt.erase
import sculpt.eval.sampling as sampling
from sculpt.cli import main
from test_multiprocess import ScriptedJudge

drawn, anchors, denoise, prepare = [0], {{}}, sampling.denoise, sculpt.erase.prepare_concept_data

def counting(pipe, latents, *args, **kwargs):
    drawn[0] += len(latents)
    return denoise(pipe, latents, *args, **kwargs)

def recording(*args, **kwargs):
    data = prepare(*args, **kwargs)
    anchors[data.name] = len(data.anchor_latents)
    return data

sampling.denoise, sculpt.erase.prepare_concept_data = counting, recording
sculpt.erase.default_judge = lambda model: ScriptedJudge(int(os.environ["RANK"]))
code = main(sys.argv[1:])
Path(os.environ["COUNTS"], os.environ["RANK"]).write_text(json.dumps({{"drawn": drawn[0], "anchors": anchors}}))
sys.exit(code)
"""


class ScriptedJudge:
    """An anchor judge that calls the first picture of a concept's first set "superclass" and the rest
    "concept" (so the rule draws the second set), and every picture of the second set "superclass". On
    a process other than the main one it calls everything "other": a judge that disagrees between
    processes, which only judging once on the main process turns into one decision."""

    fingerprint = "scripted judge 1"

    def __init__(self, rank: int = 0):
        self.rank, self.seen = rank, set()

    def __call__(self, images, concept):
        if self.rank != 0:
            return ["other"] * len(images)
        first = concept.name not in self.seen
        self.seen.add(concept.name)
        return ["superclass" if i == 0 or not first else "concept" for i in range(len(images))]


def _count_pictures(monkeypatch) -> list[int]:
    """Count the pictures this process draws from now on."""
    from sculpt.eval import sampling

    drawn, denoise = [0], sampling.denoise

    def counting(pipe, latents, *args, **kwargs):
        drawn[0] += len(latents)
        return denoise(pipe, latents, *args, **kwargs)

    monkeypatch.setattr(sampling, "denoise", counting)
    return drawn


def _launch_counting(tmp_path, args: list[str]) -> tuple[list[dict], str]:
    """`accelerate launch` of `sculpt ARGS` on two processes: what each one drew and held (COUNTING), and
    stdout."""
    script, counts = tmp_path / "counting.py", tmp_path / "counts"
    script.write_text(COUNTING.format(tests=str(Path(__file__).parent)))
    counts.mkdir(exist_ok=True)
    p = _launch(tmp_path, [str(script), *args], env={"COUNTS": str(counts)})
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    return [json.loads((counts / str(rank)).read_text()) for rank in range(2)], out


def _files(root: Path) -> dict:
    """Every file under root: its bytes; a safetensors file: its tensors and metadata (the order of the
    metadata in its header differs from process to process)."""
    from safetensors import safe_open

    def content(f: Path):
        if f.suffix != ".safetensors":
            return f.read_bytes()
        with safe_open(str(f), "pt") as data:
            return data.metadata(), {k: data.get_tensor(k).numpy().tobytes() for k in sorted(data.keys())}

    return {str(f.relative_to(root)): content(f) for f in sorted(root.rglob("*")) if f.is_file()}


def test_two_processes_draw_the_training_data_between_them_and_write_one_processs_cache(tmp_path, monkeypatch):
    """Each process draws every other batch (the same batches and seeds as one process); the gathered
    data, judged once by the anchor rule, is the cache a one-process run writes, byte for byte."""
    import sculpt.erase
    from sculpt.config import load_spec

    # two pictures a batch: every set of four is two batches, one per process
    drew, _ = _launch_counting(tmp_path, ["erase", str(_spec(tmp_path, "two", steps=2, batch_size=2, cache="cache2"))])
    monkeypatch.setattr(sculpt.erase, "default_judge", lambda model: ScriptedJudge())
    drawn = _count_pictures(monkeypatch)
    sculpt.erase.erase(load_spec(_spec(tmp_path, "one", steps=2, batch_size=2, cache="cache1")), progress=False)
    one, two = _files(tmp_path / "cache1"), _files(tmp_path / "cache2")
    assert sum(f.endswith("data.safetensors") for f in one) > 2  # two concepts and their neighbours
    assert one == two  # data (tensors and records) and PNGs alike
    assert 0 < drew[0]["drawn"] < drawn[0] and drew[0]["drawn"] + drew[1]["drawn"] == drawn[0]  # nothing twice
    # The anchor rule went by the main process's verdicts in both processes (the other process's judge
    # says "other" to everything): the second set drawn, the first set's one picture and the second
    # set's four kept.
    assert drew[0]["anchors"] == drew[1]["anchors"] == {"cat": 5, "car": 5}
    from safetensors import safe_open

    kept = []
    for f in (tmp_path / "cache2").glob("*/data.safetensors"):
        with safe_open(str(f), "pt") as data:
            record = json.loads((data.metadata() or {}).get("anchor", "{}"))
        if "with_negative" in record:
            assert "without_negative" in record
            kept.append(record["n_kept"])
    assert kept == [5, 5]


def test_two_processes_share_the_evaluations_sampling_and_measure_what_one_process_does(tmp_path, monkeypatch):
    """`sculpt eval` under a two-process launch: every phase's batches split between the processes,
    the same picture cache, metrics and report pictures as one process."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    from sculpt.cli import main
    from sculpt.eval.benchmark import IMAGENETTE

    labels = ["background"] + list(IMAGENETTE.values())
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=len(labels),
                          id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    torch.manual_seed(0)
    ResNetForImageClassification(config).save_pretrained(tmp_path / "resnet")
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(tmp_path / "resnet")
    for i, name in enumerate(IMAGENETTE):  # real pictures for FID / KID: noise, two per class
        (tmp_path / "real" / name).mkdir(parents=True)
        for j in range(2):
            g = torch.Generator().manual_seed(10 * i + j)
            pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            from PIL import Image

            Image.fromarray(pixels).save(tmp_path / "real" / name / f"{j}.png")

    # a patch that "erased" tench: cross-attention's keys nudged, as a run would leave them
    from sculpt.models.loading import cross_attention_params, load_pipeline, model_hash
    from sculpt.patch import make_patch, save_patch

    pipe = load_pipeline(str(_model(tmp_path)))
    params = cross_attention_params(pipe.unet)
    base, base_hash = {n: q.detach().clone() for n, q in params.items()}, model_hash(pipe)
    with torch.no_grad():
        for n, q in params.items():
            if n.endswith("to_k.weight"):
                q.add_(0.5 * torch.randn(q.shape, generator=torch.Generator().manual_seed(1)))
    save_patch(make_patch(pipe.unet, base, {"base_hash": base_hash, "result_hash": model_hash(pipe),
                                            "concepts": ["tench"], "stage": 1, "method": "hand"}), tmp_path / "p.safetensors")

    def args(k):
        return ["eval", "--model", str(_model(tmp_path)), "--patch", str(tmp_path / "p.safetensors"), "--classifier",
                str(tmp_path / "resnet"), "--n", "3", "--steps", "2", "--batch-size", "4", "--reference",
                str(tmp_path / "real"), "--no-unsafe", "--device", "cpu", "--cache", str(tmp_path / f"cache{k}"),
                "--out", str(tmp_path / f"eval{k}")]

    drew, printed = _launch_counting(tmp_path, args(2))
    assert printed.count("wrote") == 1  # the main process reports
    drawn = _count_pictures(monkeypatch)
    assert main(args(1)) == 0
    one, two = (json.loads((tmp_path / f"eval{k}" / "metrics.json").read_text()) for k in (1, 2))
    for m in (one, two):
        m.pop("timings")
    assert one == two and one["quality"]["fid"]["base"] is not None
    assert _files(tmp_path / "eval1" / "samples") == _files(tmp_path / "eval2" / "samples")
    assert _files(tmp_path / "cache1") == _files(tmp_path / "cache2")  # pictures and cached measurements
    assert drawn[0] == 60 and 0 < drew[0]["drawn"] < 60 and drew[0]["drawn"] + drew[1]["drawn"] == 60  # 10 x 3, twice
