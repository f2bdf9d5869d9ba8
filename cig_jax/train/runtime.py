"""Process-level run settings the trainer switches on: JAX's persistent compilation cache and profiler traces.

Owns: pointing JAX at `train.compilation_cache_dir` (every compile is cached there, so a restarted or
preempted job, or the next stage with the same step, skips XLA's compile), and `train.profile_steps:
[start, count]`: a `jax.profiler` trace of steps start .. start + count - 1 written under
`<workdir>/profile` (open it with TensorBoard's profile plugin or xprof). Remote work directories get the
trace through `cig_jax.fs` (written locally, then mirrored).

Does not own: the loop (trainer) or paths in general (`cig_jax.fs`).
"""
from __future__ import annotations

import tempfile

import jax

from cig_jax import fs


def use_compilation_cache(directory: str) -> None:
    """Caches every compiled program under `directory` (local or gs://); '' leaves JAX's default."""
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory if fs.is_remote(directory) else str(fs.path(directory)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class StepProfiler:
    """`before(step)` / `after(step)` around each step (1-based numbers of the steps being run): traces steps
    [start, start + count) into `<workdir>/profile`. Inactive when `profile_steps` is empty."""

    def __init__(self, workdir, profile_steps, *, enabled: bool = True):
        if profile_steps and (len(profile_steps) != 2 or int(profile_steps[1]) < 1):
            raise ValueError(f"train.profile_steps must be [start, count] (count >= 1), got {list(profile_steps)}")
        self.target = fs.path(workdir) / "profile"
        self.start, self.count = (int(profile_steps[0]), int(profile_steps[1])) if profile_steps else (0, 0)
        self.enabled = enabled and self.count > 0
        self.active = False
        self.local = None

    def before(self, step: int) -> None:
        if self.enabled and not self.active and self.start <= step < self.start + self.count:
            self.local = tempfile.mkdtemp(prefix="cig_profile_") if fs.is_remote(self.target) else str(self.target)
            jax.profiler.start_trace(self.local)
            self.active = True

    def after(self, step: int, result=None) -> None:
        if self.active and (step >= self.start + self.count - 1):
            if result is not None:
                jax.block_until_ready(result)
            self.stop()

    def stop(self) -> None:
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active = False
        self.enabled = False
        if fs.is_remote(self.target):
            fs.mirror(self.local, self.target)
        print(f"[profile] trace of steps {self.start}..{self.start + self.count - 1} in {self.target}", flush=True)
