"""Conversation files: JSON in/out for the dataclasses of `schema.py`.

Owns: the structural checks of parsed JSON (`conversation_from_dict`: fields, types, unknown keys), `to_dict` /
`dumps`, and the files (`load_conversation`, `save_conversation`; every file written atomically by
`atomic_write`, named by `safe_name`).

Does not own: the dataclasses, reading image files and the semantic validation (`schema.py`; this module imports
it, never the reverse), other input forms (`messages.py`).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from cig_jax.data.schema import (SCHEMA_VERSION, Conversation, Image, Person, PersonIdentity, Round, SchemaError,
                                 check_pixels, conversation_label, encode_png, identity_problem, iter_images,
                                 resolve_path, validate)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; an output file gets the mode open() would give it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------
# dict -> dataclasses (structural checks)
# ----------------------------------------------------------------------------------------------------------
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "a mapping", bool: "true/false"}


def _field(d: dict, key: str, types, where: str, required: bool = False, default: Any = None, nullable: bool = False):
    path = f"{where}.{key}" if where else key
    if key not in d:
        if required:
            raise SchemaError(f"{path}: missing required field")
        return copy.deepcopy(default)
    v = d[key]
    if v is None and nullable:
        return None
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise SchemaError(f"{path}: expected {want}{' or null' if nullable else ''}, got {type(v).__name__} {_short(v)}")
    return v


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, np.ndarray) else f"array{v.shape}"
    return s if len(s) <= 40 else s[:37] + "..."


def _check_keys(d: dict, known: tuple, where: str) -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        raise SchemaError(f"{where + '.' if where else ''}{unknown[0]}: unknown field (known: {', '.join(known)})")


def _str_dict(v: dict, where: str) -> dict:
    for k, x in v.items():
        if not isinstance(x, str):
            raise SchemaError(f"{where}.{k}: expected a string, got {type(x).__name__} {_short(x)}")
    return dict(v)


def _identity_from(d, where: str) -> Optional[PersonIdentity]:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise SchemaError(f"{where}: expected a mapping {{backend, embedding}}, got {type(d).__name__} {_short(d)}")
    _check_keys(d, ("backend", "embedding"), where)
    backend = _field(d, "backend", str, where, required=True)
    emb = _field(d, "embedding", list, where, required=True)
    problem = identity_problem(backend, emb, where)
    if problem:
        raise SchemaError(problem + ("" if "backend:" in problem else f" ({_short(emb)})"))
    return PersonIdentity(backend, tuple(float(v) for v in emb))


def _person_from(d, where: str, allow_box: bool) -> Person:
    if not isinstance(d, dict):
        raise SchemaError(f"{where}: expected a mapping, got {type(d).__name__} {_short(d)}")
    _check_keys(d, ("name", "attributes", "box", "identity") if allow_box else ("name", "attributes", "identity"),
                where)
    name = _field(d, "name", str, where, required=True)
    attrs = _str_dict(_field(d, "attributes", dict, where, default={}), f"{where}.attributes")
    box = _field(d, "box", list, where, nullable=True)
    if box is not None:
        if len(box) != 4 or not all(isinstance(b, int) and not isinstance(b, bool) for b in box):
            raise SchemaError(f"{where}.box: expected 4 integers [x0, y0, x1, y1], got {_short(box)}")
        box = tuple(box)
    identity = _identity_from(_field(d, "identity", dict, where, nullable=True), f"{where}.identity")
    return Person(name=name, attributes=attrs, box=box, identity=identity)


def _image_from(d, where: str) -> Image:
    if isinstance(d, str):  # shorthand: a bare path
        d = {"path": d}
    if not isinstance(d, dict):
        raise SchemaError(f"{where}: expected a mapping or a path string, got {type(d).__name__} {_short(d)}")
    _check_keys(d, ("path", "people", "attributes"), where)
    path = _field(d, "path", str, where, nullable=True)
    people = [_person_from(p, f"{where}.people[{i}]", True) for i, p in enumerate(_field(d, "people", list, where, default=[]))]
    attrs = _str_dict(_field(d, "attributes", dict, where, default={}), f"{where}.attributes")
    return Image(path=path, people=people, attributes=attrs)


def _round_from(d, where: str) -> Round:
    if not isinstance(d, dict):
        raise SchemaError(f"{where}: expected a mapping, got {type(d).__name__} {_short(d)}")
    _check_keys(d, ("user_text", "user_images", "assistant_text", "assistant_image", "introduces", "metadata"), where)
    user_text = _field(d, "user_text", str, where, required=True)
    user_images = [_image_from(x, f"{where}.user_images[{j}]") for j, x in enumerate(_field(d, "user_images", list, where, default=[]))]
    assistant_text = _field(d, "assistant_text", str, where, nullable=True)
    a_img = _field(d, "assistant_image", (dict, str), where, nullable=True)
    introduces = _field(d, "introduces", list, where, default=[])
    for i, n in enumerate(introduces):
        if not isinstance(n, str):
            raise SchemaError(f"{where}.introduces[{i}]: expected a string, got {type(n).__name__} {_short(n)}")
    return Round(
        user_text=user_text,
        user_images=user_images,
        assistant_text=assistant_text,
        assistant_image=None if a_img is None else _image_from(a_img, f"{where}.assistant_image"),
        introduces=list(introduces),
        metadata=_field(d, "metadata", dict, where, default={}),
    )


def conversation_from_dict(d: Any, source: str = "<dict>", base_dir: Union[str, Path, None] = None) -> Conversation:
    """Builds a Conversation from parsed JSON, checking fields and types. `source` prefixes errors (a file
    name); `base_dir` is where relative image paths point. Does not read images (see `validate`)."""
    try:
        if not isinstance(d, dict):
            raise SchemaError(f"top level: expected a mapping, got {type(d).__name__}")
        _check_keys(d, ("version", "id", "kind", "source", "people", "rounds", "metadata"), "")
        version = _field(d, "version", int, "", default=SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise SchemaError(f"version: {version} is newer than this code understands ({SCHEMA_VERSION}); update cig_jax")
        default_id = Path(source).stem if source and not source.startswith("<") else ""
        conv = Conversation(
            id=_field(d, "id", str, "", default=default_id),
            kind=_field(d, "kind", str, "", default="chat"),
            source=_field(d, "source", str, "", default=""),
            people=[_person_from(p, f"people[{i}]", False) for i, p in enumerate(_field(d, "people", list, "", default=[]))],
            rounds=[_round_from(r, f"rounds[{i}]") for i, r in enumerate(_field(d, "rounds", list, "", required=True))],
            metadata=_field(d, "metadata", dict, "", default={}),
        )
    except SchemaError as e:
        raise SchemaError(f"{source}: {e}") from None
    conv.base_dir = None if base_dir is None else str(base_dir)
    conv.file = source if not source.startswith("<") else None
    return conv


# ----------------------------------------------------------------------------------------------------------
# dataclasses -> dict
# ----------------------------------------------------------------------------------------------------------
def _person_to(p: Person) -> dict:
    d: dict = {"name": p.name, "attributes": dict(p.attributes)}
    if p.box is not None:
        d["box"] = [int(b) for b in p.box]
    if p.identity is not None:
        d["identity"] = {"backend": p.identity.backend, "embedding": [float(v) for v in p.identity.embedding]}
    return d


def _image_to(img: Image, path: Optional[str]) -> dict:
    d: dict = {"path": path}
    if img.people:
        d["people"] = [_person_to(p) for p in img.people]
    if img.attributes:
        d["attributes"] = dict(img.attributes)
    return d


def to_dict(conv: Conversation, image_paths: Optional[dict] = None) -> dict:
    """The JSON-ready mapping. Images are written by path only (pixels are never inlined); `image_paths`
    ({field path: new path}, as from `iter_images`) overrides individual paths."""
    image_paths = image_paths or {}

    def img(where, im):
        return _image_to(im, image_paths.get(where, im.path))

    rounds = []
    for r, rnd in enumerate(conv.rounds):
        d: dict = {
            "user_text": rnd.user_text,
            "user_images": [img(f"rounds[{r}].user_images[{j}]", x) for j, x in enumerate(rnd.user_images)],
            "assistant_text": rnd.assistant_text,
            "assistant_image": None if rnd.assistant_image is None else img(f"rounds[{r}].assistant_image", rnd.assistant_image),
        }
        if rnd.introduces:
            d["introduces"] = list(rnd.introduces)
        if rnd.metadata:
            d["metadata"] = copy.deepcopy(rnd.metadata)
        rounds.append(d)
    return {
        "version": SCHEMA_VERSION,
        "id": conv.id,
        "kind": conv.kind,
        "source": conv.source,
        "people": [_person_to(p) for p in conv.people],
        "rounds": rounds,
        "metadata": copy.deepcopy(conv.metadata),
    }


def dumps(d: dict) -> str:
    """The canonical JSON text (stable bytes for the same conversation)."""
    return json.dumps(d, indent=1, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------
def load_conversation(path: Union[str, Path], check_images: bool = True) -> Conversation:
    """Reads and validates a conversation JSON file. Image paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: conversation file not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SchemaError(f"{path}: not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise SchemaError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    conv = conversation_from_dict(d, source=str(path), base_dir=path.parent)
    validate(conv, check_images=check_images)
    return conv


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s) or "conversation"


def save_conversation(conv: Conversation, path: Union[str, Path], image_dir: Union[str, Path] = "images",
                      png_text: Optional[dict] = None) -> Conversation:
    """Writes `conv` as JSON at `path`; in-memory images become PNGs in `image_dir` (relative to the JSON's
    folder, or absolute) and files outside the JSON's folder are copied there. Every file is written
    atomically (temp file + os.replace), the JSON last (so a JSON on disk means a complete conversation).
    png_text: {field path (as from `iter_images`): {key: str}} text chunks for the PNGs written. Returns the
    conversation as `load_conversation` would read it."""
    path = Path(path)
    folder = path.parent
    img_dir = Path(image_dir) if Path(image_dir).is_absolute() else folder / image_dir
    label = conversation_label(conv)
    stem = safe_name(conv.id)
    new_paths: dict = {}
    for where, im in iter_images(conv):
        slot = where.replace("rounds[", "r").replace("].user_images[", "_u").replace("].assistant_image", "_a").rstrip("]")
        if im.pixels is not None:
            check_pixels(im.pixels, f"{label}: {where}.pixels")
            target = img_dir / f"{stem}_{slot}.png"
            atomic_write(target, encode_png(im.pixels, (png_text or {}).get(where)))
        elif im.path:
            src = resolve_path(im.path, conv.base_dir)
            if not src.is_file():
                raise SchemaError(f"{label}: {where}.path: file not found: {im.path}")
            try:
                src.resolve().relative_to(folder.resolve())
                target = src
            except ValueError:
                target = img_dir / f"{stem}_{slot}{src.suffix.lower() or '.png'}"
                img_dir.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, target)
        else:
            raise SchemaError(f"{label}: {where}: has neither 'path' nor pixels; nothing to save")
        new_paths[where] = Path(os.path.relpath(target.resolve(), folder.resolve())).as_posix()
    d = to_dict(conv, image_paths=new_paths)
    atomic_write(path, dumps(d).encode("utf-8"))
    return conversation_from_dict(d, source=str(path), base_dir=folder)
