"""Decoding video clips into sampled RGB frames (PyAV, OpenCV as fallback).

Owns: `Frame`, `read_frames` (frames at a given rate, in decoding order) and `VideoReadError`.
Does not own: what is done with the frames (`video.py`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np

from cig_jax.cli import UserError


class VideoReadError(UserError, RuntimeError):
    """A clip could not be opened or decoded."""


# ----------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Frame:
    index: int  # sample index: 0, 1, 2... in decoding order
    time: float  # seconds from the first frame
    pixels: np.ndarray  # [H, W, 3] uint8 RGB


def _sampled(timed: Iterable[tuple[float, Callable[[], np.ndarray]]], fps: Optional[float]) -> Iterator[Frame]:
    """Keeps the first frame at or after each multiple of 1/fps (every frame when fps is None)."""
    start, target, k = None, 0.0, 0
    for t, pixels in timed:
        start = t if start is None else start
        t -= start
        if fps is None or t + 1e-6 >= target:
            yield Frame(k, float(t), pixels())
            k += 1
            if fps is not None:
                while target <= t + 1e-6:
                    target += 1.0 / fps


def _pyav_frames(path: Path):
    import av

    try:
        container = av.open(str(path))
    except Exception as e:  # PyAV raises a family of FFmpeg errors
        raise VideoReadError(f"PyAV cannot open {path.name}: {e}") from None
    with container:
        if not container.streams.video:
            raise VideoReadError(f"{path.name} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or 25)
        n = 0
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else n / rate
                yield t, (lambda f=frame: f.to_ndarray(format="rgb24"))
                n += 1
        except Exception as e:
            if n == 0:
                raise VideoReadError(f"PyAV cannot decode {path.name}: {e}") from None
            # A truncated tail: keep what decoded.


def _opencv_frames(path: Path):
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoReadError(f"OpenCV cannot open {path.name}")
        rate = cap.get(cv2.CAP_PROP_FPS) or 25.0
        n = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            yield n / rate, (lambda b=bgr: np.ascontiguousarray(b[..., ::-1]))
            n += 1
        if n == 0:
            raise VideoReadError(f"OpenCV decoded no frames from {path.name}")
    finally:
        cap.release()


def read_frames(path: Union[str, Path], fps: Optional[float] = 2.0, decoder: str = "auto") -> Iterator[Frame]:
    """Frames of a clip sampled at `fps` (None = every frame), RGB uint8. decoder: 'pyav', 'opencv', or
    'auto' (PyAV when importable, OpenCV when PyAV is missing or cannot open the file)."""
    path = Path(path)
    if decoder not in ("auto", "pyav", "opencv"):
        raise ValueError(f"decoder must be 'auto', 'pyav' or 'opencv', got {decoder!r}")
    if not path.is_file():
        raise VideoReadError(f"{path}: file not found")
    auto = decoder == "auto"
    if auto:
        try:
            import av  # noqa: F401

            decoder = "pyav"
        except ImportError:
            decoder = "opencv"
    if decoder == "opencv":
        yield from _sampled(_opencv_frames(path), fps)
        return
    try:
        yield from _sampled(_pyav_frames(path), fps)  # raises VideoReadError only before its first frame
    except VideoReadError as e:
        if not auto:
            raise
        try:
            yield from _sampled(_opencv_frames(path), fps)
        except VideoReadError as e2:
            raise VideoReadError(f"{e}; {e2}") from None
