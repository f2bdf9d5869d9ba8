"""Preemption: knowing, at a step boundary that every process agrees on, that the job is being taken away.

Owns: the SIGTERM notice of a single-process run (a handler that only sets a flag) and, in a multi-process
run, JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`: the coordination service
hears the TPU maintenance / preemption notice or a SIGTERM on any host and names one step at which every
process stops, which is what orbax's `CheckpointManager.reached_preemption` asks too).

Does not own: what happens then (the trainer saves the state at that step, waits for the save and returns,
and the process exits 0; the next start resumes from that checkpoint).
"""
from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger(__name__)


class PreemptionWatch:
    """`with PreemptionWatch() as watch: ... if watch.reached(step): save and stop`.

    Every process must call `reached` at every step with the same step (it is a collective decision in
    multi-process runs)."""

    def __init__(self):
        self.signalled = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False

    def _on_sigterm(self, signum, frame):  # runs between bytecodes of the main thread: only set a flag
        self.signalled = True

    def reached(self, step: int) -> bool:
        """True when the run should save at `step` and stop."""
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                self.signalled = self.signalled or multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as e:  # the preemption sync manager starts with jax.distributed.initialize
                log.debug("no preemption sync point: %s", e)
        return self.signalled
