"""The one filesystem layer: work directories, checkpoints, metrics, TensorBoard logs and data directories are
path strings that may be local (`workdir/demo`) or remote (`gs://bucket/run`, `s3://...`), opened through
etils `epath` (what orbax itself uses), so a `gs://` path reaches orbax and the writers unchanged instead of
becoming a local folder named `gs:`.

Owns: turning a path string into an `epath.Path`, the metrics log (appends locally; remote object stores have
no append, so there the whole log is rewritten on each flush), and mirroring a local folder that a library
can only write locally (Hugging Face tokenizers, TensorBoard event files) to its place under a remote path.

Does not own: what is written (trainer, checkpoint) or the remote credentials (gcsfs / the TPU VM's service
account; `pip install gcsfs` for `gs://` paths).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(p: PathLike) -> bool:
    """True for URL-style paths (`gs://...`, `s3://...`)."""
    return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path (local paths made absolute; remote ones kept as URLs)."""
    if isinstance(p, epath.Path) and is_remote(p):
        return p
    s = os.fspath(p)
    return epath.Path(s if is_remote(s) else os.path.abspath(s))


def local_cache(p: PathLike, name: str) -> str:
    """A local folder for a cache that belongs with `p`: `<p>/<name>` when `p` is local, else a folder under
    the system temp directory keyed by the URL (libraries that only write locally, e.g. tokenizer builds)."""
    if not is_remote(p):
        return os.path.join(os.fspath(p), name)
    key = hashlib.sha1(os.fspath(p).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"cig_jax_{key}", name)


def mirror(local_dir: PathLike, target: PathLike) -> None:
    """Copies every file under `local_dir` to the same relative path under `target` (overwriting)."""
    target = path(target)
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        dest = target if rel == "." else target / rel
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            with open(os.path.join(root, f), "rb") as src:
                (dest / f).write_bytes(src.read())


class AppendLog:
    """A text log opened for appending, local or remote: `write` lines, `flush` makes them durable.

    Local files are appended to. Remote objects cannot be appended to, so the log keeps what the object held
    when opened plus every line since, and rewrites the object on `flush` (logs are small next to a
    checkpoint; the trainer flushes once per `log_every` steps)."""

    def __init__(self, p: PathLike):
        self.path = path(p)
        self.remote = is_remote(self.path)
        if self.remote:
            self._text = self.path.read_text() if self.path.exists() else ""
            self._file = None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")

    def write(self, s: str) -> None:
        if self.remote:
            self._text += s
        else:
            self._file.write(s)

    def flush(self) -> None:
        if self.remote:
            self.path.write_text(self._text)
        else:
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
