"""Stopping a run cleanly on SIGTERM / SIGINT (a preempted or cancelled job) and timed checkpoints."""

from __future__ import annotations

import signal
import threading
import time

import torch
from accelerate import Accelerator

# Exit status of a run that stopped on a signal after saving its checkpoint (EX_TEMPFAIL: "try again"); a
# scheduler's requeue with trainer.resume=latest continues it.
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """The run stopped on a signal after saving `checkpoint`."""

    def __init__(self, signame: str, checkpoint):
        super().__init__(f"stopped on {signame} after saving {checkpoint}")
        self.signame, self.checkpoint = signame, checkpoint


class StopRequest:
    """Records SIGTERM / SIGINT while installed (a context manager) so the loop can finish its step, save and
    exit; a second SIGINT interrupts at once. `poll` also says when a timed checkpoint is due. Every process
    polls after each step and all of them agree (a max-reduce), so they save and stop at the same step."""

    def __init__(self, accelerator: Accelerator, checkpoint_every_minutes: float = 0.0):
        self.accelerator = accelerator
        self.interval = 60.0 * checkpoint_every_minutes
        self.last_save = time.monotonic()
        self.signame: str | None = None
        self._announced = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signame == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        self.signame = signal.Signals(signum).name  # only a flag: printing here could re-enter a busy stdout

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        self._previous.clear()

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def poll(self) -> tuple[bool, bool]:
        """(stop requested on any process, timed checkpoint due on the main process)."""
        due = self.interval > 0 and time.monotonic() - self.last_save >= self.interval
        flags = torch.tensor([self.signame is not None, due and self.accelerator.is_main_process], dtype=torch.long)
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags.to(self.accelerator.device), "max").cpu()
        if flags[0] and self.signame is None:
            self.signame = "a signal on another process"
        if flags[0] and not self._announced:
            self._announced = True
            self.accelerator.print(f"\n{self.signame}: saving a checkpoint and stopping")
        return bool(flags[0]), bool(flags[1])
