"""The Hugging Face / OpenAI `messages` form of a chat, read into a `schema.Conversation`.

Owns: `conversation_from_messages` and `load_any` (a file in either form). The form is a list of
`{"role": "system" | "user" | "assistant", "content": str | [part, ...]}` (or a mapping with such a list under
`"messages"`, plus optional `"id"`), where a part is `{"type": "text", "text": ...}`, `{"type": "image",
"image" | "path" | "url": ...}` or `{"type": "image_url", "image_url": {"url": ...}}` (OpenAI). Image references
are file paths (relative to the file's folder) or `data:image/...;base64,` URLs; web URLs are refused (nothing
is downloaded). Consecutive user messages form one round's user turn (text and images in their order: an image
after text is placed with an `<image>` marker); the assistant message after them is the round's answer (its text,
and its image if any); a user turn with no answer after it is a pending round (what sampling fills). System
messages are kept in `metadata["system"]`.

Does not own: the conversation dataclasses and their validation (`schema.py`), the native JSON (`schema_io.py`).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Optional, Union

from cig_jax.data import schema
from cig_jax.data import schema_io


def is_messages(d: Any) -> bool:
    """Whether parsed JSON is the `messages` form (a list of role/content mappings, or {"messages": [...]})."""
    if isinstance(d, dict) and "messages" in d and "rounds" not in d:
        d = d["messages"]
    return isinstance(d, list) and all(isinstance(m, dict) and "role" in m for m in d) and bool(d)


def _image_ref(part: dict, where: str) -> str:
    kind = part.get("type")
    if kind == "image_url":
        ref = part.get("image_url")
        ref = ref.get("url") if isinstance(ref, dict) else ref
    else:
        ref = next((part[k] for k in ("image", "path", "url") if isinstance(part.get(k), str)), None)
    if not isinstance(ref, str) or not ref:
        raise schema.SchemaError(f"{where}: an image part needs a path or a data URL "
                                 "('image', 'path', 'url' or 'image_url.url')")
    return ref


def _image(ref: str, where: str, base_dir) -> schema.Image:
    if ref.startswith("data:"):
        head, _, data = ref.partition(",")
        if ";base64" not in head:
            raise schema.SchemaError(f"{where}: only base64 data URLs are read (data:image/png;base64,...)")
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as e:
            raise schema.SchemaError(f"{where}: bad base64 in the data URL: {e}") from None
        return schema.Image(pixels=schema.decode_png(raw, where=where))
    if ref.startswith(("http://", "https://")):
        raise schema.SchemaError(f"{where}: {ref[:60]}: web images are not downloaded; save the file next to the "
                                 "JSON and give its path")
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    return schema.Image(path=ref)


def _parts(content, where: str) -> list:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise schema.SchemaError(f"{where}.content: expected a string or a list of parts, got {type(content).__name__}")
    out = []
    for k, p in enumerate(content):
        if isinstance(p, str):
            p = {"type": "text", "text": p}
        if not isinstance(p, dict) or p.get("type") not in ("text", "image", "image_url"):
            raise schema.SchemaError(f"{where}.content[{k}]: expected a part of type text, image or image_url")
        out.append(p)
    return out


def conversation_from_messages(d: Any, source: str = "<messages>", base_dir: Union[str, Path, None] = None,
                               conv_id: Optional[str] = None) -> schema.Conversation:
    """The conversation of a `messages` list (see the module docstring); not validated (call schema.validate)."""
    meta: dict = {}
    if isinstance(d, dict):
        conv_id = d.get("id", conv_id)
        d = d.get("messages")
    if not isinstance(d, list):
        raise schema.SchemaError(f"{source}: expected a list of messages")
    default_id = Path(source).stem if not source.startswith("<") else "chat"
    conv = schema.Conversation(id=str(conv_id or default_id), kind="chat", source="messages")
    turn: list = []  # parts of the user turn being gathered

    def close(answer: Optional[list], where: str):
        texts, images, marked = [], [], False
        for p in turn:
            if p["type"] == "text":
                texts.append(p["text"])
            else:
                images.append(_image(_image_ref(p, where), where, base_dir))
                if any(t.strip() for t in texts):
                    marked = True
                texts.append(schema.IMAGE_PLACEHOLDER)
        if marked:
            user_text = "".join(texts).strip()
        else:
            user_text = "".join(t for t in texts if t != schema.IMAGE_PLACEHOLDER).strip()
        rnd = schema.Round(user_text=user_text, user_images=images)
        if answer is not None:
            rnd.assistant_text = "".join(p["text"] for p in answer if p["type"] == "text").strip()
            pics = [p for p in answer if p["type"] != "text"]
            if len(pics) > 1:
                raise schema.SchemaError(f"{where}: an answer holds at most one image, got {len(pics)}")
            if pics:
                rnd.assistant_image = _image(_image_ref(pics[0], where), where, base_dir)
        conv.rounds.append(rnd)
        turn.clear()

    try:
        for i, m in enumerate(d):
            where = f"messages[{i}]"
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise schema.SchemaError(f"{where}.role: expected 'system', 'user' or 'assistant'")
            parts = _parts(m.get("content"), where)
            if m["role"] == "system":
                meta.setdefault("system", []).append("".join(p.get("text", "") for p in parts))
            elif m["role"] == "user":
                turn.extend(parts)
            elif not turn:
                raise schema.SchemaError(f"{where}: an assistant message must follow a user message")
            else:
                close(parts, where)
        if turn:
            close(None, f"messages[{len(d) - 1}]")
    except schema.SchemaError as e:
        raise schema.SchemaError(f"{source}: {e}") from None
    conv.metadata = meta
    conv.base_dir = None if base_dir is None else str(base_dir)
    conv.file = None if source.startswith("<") else source
    return conv


def load_any(path) -> schema.Conversation:
    """A validated conversation from a JSON file in our form or the `messages` form."""
    path = Path(path)
    if not path.is_file():
        raise schema.SchemaError(f"{path}: conversation file not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise schema.SchemaError(f"{path}: not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise schema.SchemaError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if is_messages(d):
        conv = conversation_from_messages(d, source=str(path), base_dir=path.parent)
    else:
        conv = schema_io.conversation_from_dict(d, source=str(path), base_dir=path.parent)
    schema.validate(conv)
    return conv
