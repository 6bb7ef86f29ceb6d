"""The processes of one `accelerate launch` sharing work that splits by picture: training data and
evaluation pictures.

A picture depends, by a pixel level at most, on the batch it is drawn in (tests/test_eval.py), so
sampling splits by whole batches: batch b of what one process would draw goes to process b mod N,
with the same members and seeds, and the pictures are then gathered in batch order. Every process
ends with the pictures of a one-process run, bit for bit. Whatever decides what runs next (which
data is missing, a judge's verdicts, a measurement found in the cache) is decided once, on the main
process or by all together, so that every process makes the same collective calls in the same order.

Outside `accelerate launch` (or torchrun) there is one process and every method is the identity.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Processes:
    count: int = 1
    index: int = 0
    device: torch.device | None = None  # this process's device in a launch (None: one process)

    @property
    def main(self) -> bool:
        return self.index == 0

    def place(self, device):
        """This process's device for `device` ("cuda" on process 1 of a launch on GPUs: its own, cuda:1);
        `device` itself outside a launch, or when it names another type or an index."""
        if self.device is None or self.device.type == "cpu":  # one CPU for all
            return device
        asked = torch.device(device)
        return str(self.device) if asked.type == self.device.type and asked.index is None else device

    def draws(self, batch: int) -> bool:
        """Whether this process draws batch number `batch` (counted from 0 over one sampling call)."""
        return batch % self.count == self.index

    def gather(self, items: list) -> list:
        """Every process's `items` (picklable), concatenated in process order, on every process."""
        if self.count == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def broadcast(self, value):
        """The main process's `value` on every process."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on one of them."""
        return any(self.gather([bool(flag)]))


ONE = Processes()


def current() -> Processes:
    """The processes of the running launch: accelerate's state when a launcher started several (it
    joins them, as `Accelerator()` would) or when one is already set up; else one process."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched and "accelerate" not in sys.modules:
        return ONE
    from accelerate.state import PartialState

    if not launched and not PartialState._shared_state:
        return ONE
    # Without a GPU, accelerate joins the processes over gloo only when told to run on the CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1:
        return ONE
    return Processes(state.num_processes, state.process_index, state.device)
