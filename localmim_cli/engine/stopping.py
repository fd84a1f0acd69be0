"""Stopping a run on request: Ctrl-C (SIGINT) or SIGTERM (what SLURM and cloud schedulers send
before preemption) ends the step in progress, saves a checkpoint and exits saying how to resume.

The signal only raises a flag; the step loop looks at it at each step boundary, so a checkpoint
is never written from inside a signal handler and never half-way through an optimizer step. A
second Ctrl-C aborts at once (the last checkpoint on disk is intact: checkpoints are written
into a temporary folder and renamed into place).

Under torchrun the processes must stop at the same step; they agree on the flag where they
already synchronise (logging and checkpoint steps), so stopping costs no extra wait per step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from localmim_cli.engine import distributed
from localmim_cli.errors import RunAborted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(*_: Any) -> None:
    """A DataLoader worker_init_fn: a Ctrl-C at the terminal reaches the workers too, and they
    must keep feeding the main process until it has reached the step boundary and saved."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopRequest:
    """While entered, SIGINT and SIGTERM set `signum` instead of killing the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():   # signals only reach the main thread
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise RunAborted(signum, "aborted at once by a second Ctrl-C; the last checkpoint on disk is intact")
        if self.signum is None:
            self.signum = signum

    def agreed(self, world: distributed.World, device: torch.device) -> int | None:
        """The signal to stop for, as every process sees it (one all-reduce under torchrun)."""
        if not world.distributed:
            return self.signum
        flag = torch.tensor(float(self.signum or 0), device=device)
        flag = distributed.all_reduce_max(flag, world)
        return int(flag.item()) or None
