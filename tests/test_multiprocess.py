"""Several processes, one run: `accelerate launch` with two CPU processes (gloo) erases like one process
would (global batch split, gradients averaged, the same mask and best epoch everywhere) and only the
main process writes the folder."""

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


def test_two_processes_under_accelerate_launch_make_one_run(tmp_path):
    from sculpt.models.tiny import tiny_pipeline

    tiny_pipeline(seed=0).save_pretrained(tmp_path / "model")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""\
model: {tmp_path / 'model'}
output: {tmp_path / 'run'}
method: {{name: sculpting, lr: 1.0e-3, epochs: 2, steps_per_epoch: 6, warmup_steps: 2, mask_update_every: 4}}
concepts:
  - {{name: cat, superclass: animal}}
  - {{name: car, superclass: vehicle, synonyms: [automobile]}}
data: {{n_images: 4, num_inference_steps: 2, batch_size: 4, cache_dir: {tmp_path / 'cache'}}}
""")
    launcher = Path(sys.executable).parent / "accelerate"
    # On a machine without GPUs, --multi_gpu is what makes accelerate start torchrun; the processes
    # then find no CUDA and join over gloo on the CPU.
    r = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                        "-m", "sculpt.cli", "erase", str(spec)],
                       capture_output=True, text=True, timeout=600,
                       env={"PATH": str(launcher.parent), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                            "SCULPT_PROGRESS": "lines", "HOME": str(tmp_path)})
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
