#!/usr/bin/env python
"""Screenshots a sample.py transcript in headless Chromium and checks that every image on it renders.

    python scripts/screenshot_transcript.py out/transcript.html [--shot out/transcript.png]

The transcript is copied to a temporary page (with a <base> pointing at its folder, so image paths still
resolve) that frames every chat image with a 4 px rgb(255, 0, 255) outline; Chromium screenshots it; each frame
is found in the screenshot and the pixels inside it are compared with the image file, scaled as the page shows
it (`image-rendering: pixelated`, integer scale). An image counts as rendered when the mean absolute difference
is below 8 (of 255). Prints one line per image and a summary; exit status 0 when all render, 1 otherwise,
2 without Chromium (`apt-get install chromium`).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from PIL import Image

FRAME = (255, 0, 255)
WIDTH = 1000
_IMG = re.compile(r'<img class="chat-image" src="([^"]+)" width="(\d+)" height="(\d+)"')
_STYLE = ("<style>img.chat-image { outline: 4px solid rgb(255, 0, 255); outline-offset: 0; }"
          " body { background: #ffffff; }</style>")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page: Path, shot: Path, height: int, chromium: str) -> None:
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--force-device-scale-factor=1", "--default-background-color=ffffffff",
           f"--window-size={WIDTH},{height}", f"--screenshot={shot}", page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def _frames(pixels: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (y0, x0, y1, x1) of the outline frames, in reading order."""
    from scipy import ndimage

    mask = np.all(pixels[..., :3] == FRAME, axis=-1)
    labels, n = ndimage.label(mask)
    boxes = []
    for sl in ndimage.find_objects(labels):
        y, x = sl
        if y.stop - y.start > 8 and x.stop - x.start > 8:  # a frame, not a stray pixel of an image
            boxes.append((y.start, x.start, y.stop, x.stop))
    return sorted(boxes)


def check(transcript: Path, shot: Path, chromium: str | None = None) -> dict:
    """Screenshots `transcript` into `shot`; returns {"images": n, "rendered": k, "details": [...]}."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found (apt-get install chromium)")
    transcript = Path(transcript).resolve()
    text = transcript.read_text(encoding="utf-8")
    images = [(unquote(src), int(w), int(h)) for src, w, h in _IMG.findall(text)]
    base = f'<base href="{transcript.parent.as_uri()}/">'
    page_text = text.replace("<head>", "<head>" + base + _STYLE, 1)
    height = 400 + sum(h + 160 for _, _, h in images)
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(page_text, encoding="utf-8")
        screenshot(page, Path(shot), height, chromium)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    frames = _frames(pixels)
    details = []
    for k, (src, w, h) in enumerate(images):
        if k >= len(frames):
            details.append((src, "no frame on the screenshot"))
            continue
        y0, x0, y1, x1 = frames[k]
        inside = pixels[y0 + 4:y1 - 4, x0 + 4:x1 - 4].astype(np.float32)
        with Image.open(transcript.parent / src) as im:
            ref = im.convert("RGB")
        scale = w // ref.width
        expected = np.asarray(ref, np.float32).repeat(scale, axis=0).repeat(scale, axis=1)
        if inside.shape != expected.shape:
            details.append((src, f"shown {inside.shape[1]}x{inside.shape[0]}, expected {w}x{h}"))
            continue
        diff = float(np.abs(inside - expected).mean())
        details.append((src, "rendered" if diff < 8.0 else f"wrong pixels (mean |diff| {diff:.1f})"))
    rendered = sum(d == "rendered" for _, d in details)
    return {"images": len(images), "rendered": rendered, "frames": len(frames), "details": details,
            "screenshot": str(shot)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("transcript", type=Path)
    ap.add_argument("--shot", type=Path, help="where the screenshot goes (default: next to the transcript)")
    args = ap.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("screenshot_transcript: chromium not found (apt-get install chromium)", file=sys.stderr)
        return 2
    shot = args.shot or args.transcript.with_suffix(".png")
    report = check(args.transcript, shot, chromium)
    for src, what in report["details"]:
        print(f"{src}: {what}")
    print(f"{report['rendered']}/{report['images']} images rendered; screenshot {report['screenshot']}")
    return 0 if report["rendered"] == report["images"] and report["images"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
