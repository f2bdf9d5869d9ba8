"""TensorBoard scalars under `<workdir>/tensorboard`, local or remote.

Owns: a tensorboardX `SummaryWriter` that writes straight into a local workdir, or, for a remote one
(`gs://...`), into a local staging folder mirrored to `<workdir>/tensorboard` through `cig_jax.fs` on every
flush (tensorboardX cannot write to object stores itself without extra cloud clients).

Does not own: which scalars are logged (the trainer).
"""
from __future__ import annotations

import tempfile

from tensorboardX import SummaryWriter

from cig_jax import fs


class TensorBoardWriter:
    def __init__(self, logdir):
        self.target = fs.path(logdir)
        self.remote = fs.is_remote(self.target)
        self.local = tempfile.mkdtemp(prefix="cig_tb_") if self.remote else str(self.target)
        self.writer = SummaryWriter(self.local)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            fs.mirror(self.local, self.target)

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            fs.mirror(self.local, self.target)
