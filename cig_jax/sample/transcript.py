"""The transcript: completed conversations as one HTML page a person reads, a chat with the images inline.

Owns: `transcript_html` (saved conversations -> an HTML document) and `write_transcript` (written atomically).
Images are linked by the relative paths of the saved JSON (the page sits next to it), shown at an integer
multiple of their size with `image-rendering: pixelated`, so a screenshot shows their pixels exactly
(`scripts/screenshot_transcript.py` checks that). Every image tag carries `class="chat-image"`, its `src`,
`width` and `height` in this fixed order, which that check parses.

Does not own: the conversations (`cig_jax/data/schema.py`), sampling (`session.py`), the command line (`sample.py`).
"""
from __future__ import annotations

import html
import urllib.parse
from pathlib import Path
from typing import Sequence

from PIL import Image as PILImage

from cig_jax.data import schema
from cig_jax.data import schema_io

DISPLAY = 192  # target side of an image on the page, in CSS pixels (rounded to an integer multiple)

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; background: #f3f4f6; margin: 0;
       padding: 24px; color: #111827; }
.conv { max-width: 760px; margin: 0 auto 48px; }
.conv h2 { font-size: 18px; margin: 0 0 4px; }
.people { font-size: 13px; color: #4b5563; margin: 0 0 16px; }
.msg { display: flex; margin: 10px 0; }
.msg.user { justify-content: flex-end; }
.bubble { max-width: 75%; padding: 10px 14px; border-radius: 14px; background: #ffffff;
          box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.msg.user .bubble { background: #dbeafe; }
.who { font-size: 12px; color: #6b7280; margin-bottom: 4px; }
.text { margin: 4px 0; white-space: pre-wrap; }
img.chat-image { display: block; margin: 6px 0; image-rendering: pixelated; }
.note { font-size: 11px; color: #6b7280; margin-top: 4px; }
.pending { color: #9ca3af; font-style: italic; }
"""


def _image_tag(image: schema.Image, folder: Path) -> str:
    if not image.path:
        return '<p class="pending">(image not saved)</p>'
    try:
        with PILImage.open(folder / image.path) as im:
            w, h = im.size
    except OSError:
        w = h = DISPLAY
    scale = max(1, DISPLAY // max(w, h))
    src = urllib.parse.quote(Path(image.path).as_posix())
    who = ", ".join(p.name for p in image.people if p.name)
    alt = html.escape(who or Path(image.path).name)
    return f'<img class="chat-image" src="{src}" width="{w * scale}" height="{h * scale}" alt="{alt}">'


def _conversation(conv: schema.Conversation, folder: Path) -> str:
    out = [f'<section class="conv"><h2>{html.escape(conv.id or "conversation")}</h2>']
    if conv.people:
        people = "; ".join(html.escape(p.name + (" (" + ", ".join(f"{k}: {v}" for k, v in p.attributes.items()) + ")"
                                                  if p.attributes else "")) for p in conv.people)
        out.append(f'<p class="people">People: {people}</p>')
    for r, rnd in enumerate(conv.rounds):
        parts = []
        for seg in schema.user_segments(rnd):
            parts.append(f'<p class="text">{html.escape(seg)}</p>' if isinstance(seg, str) else _image_tag(seg, folder))
        out.append(f'<div class="msg user"><div class="bubble"><div class="who">User · round {r + 1}</div>'
                   f'{"".join(parts)}</div></div>')
        parts = []
        if rnd.pending:
            parts.append('<p class="pending">(no answer yet)</p>')
        if rnd.assistant_text:
            parts.append(f'<p class="text">{html.escape(rnd.assistant_text)}</p>')
        if rnd.assistant_image is not None:
            parts.append(_image_tag(rnd.assistant_image, folder))
        sample = rnd.metadata.get("sample") if isinstance(rnd.metadata, dict) else None
        if isinstance(sample, dict):
            bits = [f"seed {sample['seed']}"] if "seed" in sample else []
            bits += [str(sample["identity"])] if "identity" in sample else []
            if sample.get("dropped_rounds"):
                bits.append(f"rounds {sample['dropped_rounds']} left out of the context")
            parts.append(f'<div class="note">{html.escape("; ".join(bits))}</div>')
        out.append(f'<div class="msg assistant"><div class="bubble"><div class="who">Assistant</div>'
                   f'{"".join(parts) or "<p class=pending>(nothing)</p>"}</div></div>')
    out.append("</section>")
    return "\n".join(out)


def transcript_html(convs: Sequence[schema.Conversation], folder, title: str = "Transcript") -> str:
    """An HTML page showing `convs` (as saved under `folder`: image paths relative to it) as chats."""
    folder = Path(folder)
    body = "\n".join(_conversation(c, folder) for c in convs)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_transcript(path, convs: Sequence[schema.Conversation], title: str = "Transcript") -> Path:
    """Writes `transcript_html` to `path` atomically; image paths resolve against path's folder."""
    path = Path(path)
    schema_io.atomic_write(path, transcript_html(convs, path.parent, title).encode("utf-8"))
    return path
