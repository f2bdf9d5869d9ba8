"""One browser session's chat: a `ChatSession` (its own history and KV cache) plus the files the page shows.

Owns: `AppChat`, what the web app does per browser session without knowing the web framework: a round from the
text and the uploaded image of a turn (the upload checked: readable, an image, not too large, a supported mode),
the per-round controls (seed, guidance scales, diffusion steps, force image), undo of the last round (the
session replays the history without it: the cache keeps the common prefix), reset, loading a history (the zip the
app downloads, or a JSON, ours or the Hugging Face / OpenAI `messages` form, with its images), and the export (history JSON + images + transcript, and one zip).
Every problem a user can cause is a `notice` in the chat, never an exception: the session stays usable.
`messages()` is the chat as the page draws it.

Does not own: the page (`cig_jax/app/ui.py`), sampling (`cig_jax/sample/session.py`), the conversation files
(`cig_jax/data/schema.py`), the transcript (`cig_jax/sample/transcript.py`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from cig_jax.data import messages, schema, schema_io
from cig_jax.sample.session import ChatSession, ContextOverflowError
from cig_jax.sample.transcript import write_transcript

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an upload larger than this is refused
MAX_UPLOAD_SIDE = 4096  # ... and so is an image with a side longer than this


@dataclasses.dataclass
class Entry:
    """One line of the chat as shown: a round (user + answer) or a notice (shown, not part of the history)."""

    user_text: str = ""
    user_image: Optional[str] = None  # a PNG under the session's folder
    answer_text: str = ""
    answer_image: Optional[str] = None
    notice: Optional[str] = None  # a message to the user (bad upload, full context...)
    params: dict = dataclasses.field(default_factory=dict)


def read_upload(path, where: str = "upload"):
    """The uploaded file `path` as uint8 [H, W, 3] pixels. Raises SchemaError with a message for the user:
    missing, too large (bytes or pixels), not an image, an unsupported mode (CMYK, 16-bit...)."""
    from PIL import Image as PILImage

    path = Path(path)
    shown = path.name
    if not path.is_file():
        raise schema.SchemaError(f"{where}: file not found: {shown}")
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise schema.SchemaError(f"{where}: {shown} is {size / 2**20:.1f} MiB; images up to "
                                 f"{MAX_UPLOAD_BYTES // 2**20} MiB are accepted")
    try:
        with PILImage.open(path) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - PIL raises several types for data that is not an image
        raise schema.SchemaError(f"{where}: {shown} is not an image PIL can read (PNG, JPEG, WebP, ...)") from None
    if max(w, h) > MAX_UPLOAD_SIDE:
        raise schema.SchemaError(f"{where}: {shown} is {w}x{h} pixels; sides up to {MAX_UPLOAD_SIDE} are accepted")
    return schema.read_image(path, where=where, shown=shown)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


def image_references(tree) -> list:
    """Every string in a history's JSON tree that names an image file (ours: user_images / assistant_image paths;
    the `messages` form: image parts), in order."""
    if isinstance(tree, dict):
        return [r for v in tree.values() for r in image_references(v)]
    if isinstance(tree, list):
        return [r for v in tree for r in image_references(v)]
    if isinstance(tree, str) and not tree.startswith("data:") and tree.lower().endswith(IMAGE_SUFFIXES):
        return [tree]
    return []


def history_in_zip(archive: Path, folder: Path) -> Path:
    """Extracts `archive` (a chat the app downloaded) into `folder` and returns its history JSON (chat.json, or the
    one JSON at its top). Members that would land outside `folder` are refused."""
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        for name in names:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise schema.SchemaError(f"Load: {archive.name}: member {name!r} points outside the archive")
        z.extractall(folder)
    tops = sorted(n for n in names if "/" not in n.strip("/") and n.lower().endswith(".json"))
    if "chat.json" in tops:
        return folder / "chat.json"
    if len(tops) != 1:
        raise schema.SchemaError(f"Load: {archive.name} holds {len(tops)} history JSON files at its top; expected "
                                 "one (the app's downloads hold chat.json)")
    return folder / tops[0]


class AppChat:
    """The chat of one browser session over `session` (a `ChatSession` of batch size 1, used by no one else);
    its files go to a fresh folder under `root`."""

    def __init__(self, session: ChatSession, root):
        self.session = session
        Path(root).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="chat_", dir=root))
        self.entries: list = []
        self._n = 0  # file counter: every image gets a new name (pages never show a stale cached one)

    # -- a round ---------------------------------------------------------------------------------------
    def send(self, text: str, upload=None, *, seed: int = 0, visual_scale: Optional[float] = None,
             identity_scale: Optional[float] = None, num_steps: Optional[int] = None,
             force_image: bool = False) -> Optional[str]:
        """One round. Returns None, or the notice shown instead (the history is then unchanged)."""
        text = (text or "").strip()
        images, shown = [], None
        try:
            if upload:
                pixels = read_upload(upload)
                images, shown = [pixels], self._png(pixels)
            if not text and not images:
                return self._notice("Type a message or attach an image.")
            params = dict(seed=int(seed), visual_scale=visual_scale, identity_scale=identity_scale,
                          num_steps=None if not num_steps else int(num_steps), force_image=bool(force_image))
            options = self.session.options(visual_scale=visual_scale, identity_scale=identity_scale,
                                           num_steps=params["num_steps"], force_image=bool(force_image))
            result = self.session.round(text, images, seed=int(seed), options=options)
        except (schema.SchemaError, ContextOverflowError) as e:
            return self._notice(str(e))
        except Exception as e:  # noqa: BLE001 - the page shows a message; the session stays usable
            log.exception("round failed")
            return self._notice(f"the round failed ({type(e).__name__}: {e}); the history is unchanged")
        params["stop"] = result.stop
        self.entries.append(Entry(text, shown, result.text,
                                  None if result.image is None else self._png(result.image), params=params))
        return None

    def undo(self) -> Optional[str]:
        """Removes the last round (the history and the cache roll back to before it)."""
        rounds = self.session.history.rounds
        if not rounds:
            return self._notice("Nothing to undo.")
        self._replay(dataclasses.replace(self.session.history, rounds=rounds[:-1]))
        k = max(i for i, e in enumerate(self.entries) if e.notice is None)
        del self.entries[k:]
        return None

    def reset(self) -> None:
        self.session.reset()
        self.entries = []

    def load(self, files) -> Optional[str]:
        """Makes the answered rounds of a history the chat. `files`: one path or several: a zip the app downloaded
        (history JSON + images + transcript), or a history JSON (ours, or a `messages` list) with its images
        beside it, or uploaded with it (an image the JSON names is found by its file name among the uploads)."""
        try:
            conv = schema.with_pixels(messages.load_any(self._unpack(files)))
            answered = dataclasses.replace(conv, rounds=[r for r in conv.rounds if not r.pending])
            self._replay(answered)
        except (schema.SchemaError, ContextOverflowError) as e:
            return self._notice(str(e))
        self.entries = [Entry(r.user_text, self._png(r.user_images[0].pixels) if r.user_images else None,
                              r.assistant_text or "",
                              None if r.assistant_image is None else self._png(r.assistant_image.pixels))
                        for r in answered.rounds]
        return None

    def _unpack(self, files) -> Path:
        """The history JSON to load from `files` (see `load`), laid out in a folder of this session so that the
        paths it names resolve."""
        paths = [Path(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else list(files or []))]
        if not paths:
            raise schema.SchemaError("Load: no file given")
        archives = [p for p in paths if zipfile.is_zipfile(p)]
        histories = [p for p in paths if p.suffix.lower() in (".json", ".jsonl")]
        self._n += 1
        folder = self.folder / f"load_{self._n}"
        if archives:
            if len(paths) > 1:
                raise schema.SchemaError("Load: give the downloaded zip alone")
            return history_in_zip(archives[0], folder)
        if len(histories) != 1:
            raise schema.SchemaError(f"Load: give one history JSON (or the downloaded zip); got {len(histories)} "
                                     f"JSON files among {len(paths)}")
        history = histories[0]
        uploads = {p.name: p for p in paths if p != history}
        folder.mkdir(parents=True)
        target = folder / history.name
        shutil.copyfile(history, target)
        try:
            refs = image_references(json.loads(history.read_text(encoding="utf-8")))
        except ValueError:  # not JSON: load_any says where, in one line
            refs = []
        for ref in refs:
            rel = Path(ref)
            if rel.is_absolute() or ".." in rel.parts:
                continue
            src = history.parent / rel if (history.parent / rel).is_file() else uploads.get(rel.name)
            if src is not None:
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, folder / rel)
        return target

    def _replay(self, conv: schema.Conversation) -> None:
        if conv.rounds:
            self.session.replay(conv)
        else:
            self.session.reset()

    # -- what the page shows and downloads -------------------------------------------------------------
    def messages(self) -> list:
        """The chat as a list of {"role", "content"} (content: text, or a list of text and {"path": png})."""
        out = []
        for e in self.entries:
            if e.notice is not None:
                out.append({"role": "assistant", "content": f"⚠ {e.notice}"})
                continue
            user = [e.user_text] if e.user_text else []
            if e.user_image:
                user.append({"path": e.user_image})
            out.append({"role": "user", "content": user})
            answer = [e.answer_text] if e.answer_text else []
            if e.answer_image:
                answer.append({"path": e.answer_image})
            out.append({"role": "assistant", "content": answer or ["(no answer)"]})
        return out

    def export(self) -> list:
        """Writes the history (chat.json + images/), transcript.html and chat.zip (all of them); returns the
        paths [chat.json, transcript.html, chat.zip]."""
        self._n += 1
        out = self.folder / f"export_{self._n}"
        conv = self.session.history
        conv.kind, conv.source = "chat", "app.py"
        saved = schema_io.save_conversation(conv, out / "chat.json")
        page = write_transcript(out / "transcript.html", [saved], title="Chat")
        archive = out / "chat.zip"
        with zipfile.ZipFile(archive, "w") as z:
            for f in sorted(out.rglob("*")):
                if f.is_file() and f != archive:
                    z.write(f, f.relative_to(out).as_posix())
        return [str(out / "chat.json"), str(page), str(archive)]

    # -- helpers -----------------------------------------------------------------------------------------
    def _notice(self, text: str) -> str:
        self.entries.append(Entry(notice=text))
        return text

    def _png(self, pixels) -> str:
        self._n += 1
        path = self.folder / f"image_{self._n:04d}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(schema.encode_png(pixels))
        os.replace(tmp, path)
        return str(path)

    def summary(self) -> str:
        """One line about the session (rounds, cache use) for the page."""
        rounds = len(self.session.history.rounds)
        return json.dumps({"rounds": rounds, "cache_slots_used": self.session.cache.index,
                           "cache_slots": self.session.max_len})
