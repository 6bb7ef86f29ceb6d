"""Progress of long phases: a bar with an estimate on a terminal, one line per phase elsewhere.

    with progress("eval: base model", total=992, unit="img") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

On a terminal (stderr is a tty) this is a tqdm bar with rate and time left. Redirected to a file or
a pipe, carriage-return updates would pile up (a stage's bar wrote ~1 MB of them), so the phase
prints exactly one line when it ends: what it did, how many items, how long it took.
`SCULPT_PROGRESS=bars|lines|off` overrides the choice (e.g. `off` in scripts that print their own).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, TextIO


def progress_mode(stream: TextIO | None = None) -> str:
    """'bars' on a terminal, 'lines' otherwise, or what SCULPT_PROGRESS says."""
    forced = os.environ.get("SCULPT_PROGRESS", "").strip().lower()
    if forced in ("bars", "lines", "off"):
        return forced
    stream = stream if stream is not None else sys.stderr
    try:
        return "bars" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return "lines"


class Progress:
    """One phase. update(n) as work is done, set_postfix(...) for live values, close() at the end
    (a `with` block does it). Nothing is printed for a phase with nothing to do (total == 0)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", enabled: bool = True,
                 stream: TextIO | None = None, leave: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.mode = progress_mode(self.stream) if enabled and total != 0 else "off"
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self.closed = False
        self.bar = None
        if self.mode == "bars":
            from tqdm.auto import tqdm

            # A terminal that reports no width (a pty without a size) would get zero-width bars.
            width = shutil.get_terminal_size(fallback=(100, 24)).columns or 100
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, file=self.stream, ncols=width)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, values: dict[str, Any]) -> None:
        self.postfix = dict(values)
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines":
            seconds = time.perf_counter() - self.t0
            rate = f", {self.n / seconds:.1f} {self.unit}/s" if seconds > 0 and self.n else ""
            extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.n} {self.unit} in {seconds:.1f}s{rate}{extra}", file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True, **kw) -> Progress:
    return Progress(desc, total=total, unit=unit, enabled=enabled, **kw)
