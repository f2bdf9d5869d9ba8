"""Where conversation records come from: the one place that opens them, for training, evaluation, sampling
and the recipe.

Owns: opening records by source (`open_records`): a synthetic draw in memory, a split of an array_record build
(`tfds_builder`), a folder of conversation JSON files, a JSONL file of conversations, one JSON file; the
records of a stage's data config (`stage_records`); selecting records by kind (`KindSubset`) and counting a
record's images (`num_images`) without decoding records where the source knows them (array_record builds store
both per record).

Does not own: the record format (`schema.py`, `tfds_builder.py`), tokenization and batching (`pipeline.py`),
what a stage trains on (`cig_jax/train/stages.py` names the default kinds).

Records are a random-access `Sequence[Conversation]`; array_record images are decoded on access, files' images
are read on access (`schema.Image.load`), synthetic ones are in memory.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from cig_jax.data import messages, schema, schema_io, synthetic


def open_records(source: str, *, data_dir: str = "", split: str = "train", num: Optional[int] = None,
                 seed: int = 0, size: int = 64, kinds: Sequence[str] = (), names: str = "train") -> Sequence:
    """The records of `source`, only `kinds` (empty: all), at most `num` (None: all; a synthetic draw: 16).

    source: 'synthetic' (a fresh draw of `num` conversations from `seed`, rendered at `size`, its recall
    conversations naming people from the `names` pool: 'train' or 'heldout'), 'tfds' (split
    `split` of the array_record build under `data_dir`), a folder of conversation JSON files, a `.jsonl` file,
    or one `.json` file."""
    kinds = tuple(kinds)
    if source == "synthetic":
        return list(synthetic.generate(16 if num is None else num, seed=seed, kinds=kinds or synthetic.KINDS,
                                       size=size, names=names))
    if source == "tfds":
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"{data_dir}: no dataset folder (draw it with `python train.py --config "
                                    f"configs/demo.yaml`, or build one with `python -m cig_jax.data.tfds_builder`)")
        from cig_jax.data import tfds_builder  # tensorflow-datasets only where array_record files are read

        records = KindSubset(tfds_builder.load_records(data_dir, split), kinds)
        return records if num is None or num >= len(records) else _Head(records, num)
    convs = [c for c, _ in open_files(Path(source))]
    convs = [c for c in convs if not kinds or c.kind in kinds]
    return convs if num is None else convs[:num]


def stage_records(data, default_kinds: Sequence[str] = ()) -> Sequence:
    """The records a training stage reads (`data`: a `config.DataConfig` whose source is synthetic or tfds)."""
    kinds = tuple(data.kinds) or tuple(default_kinds)
    if data.source == "synthetic":
        return open_records("synthetic", num=data.num_records, seed=data.seed, size=data.render_size, kinds=kinds)
    if data.source == "tfds":
        return open_records("tfds", data_dir=data.dir, split=data.split, kinds=sorted(set(kinds)))
    raise ValueError(f"data.source {data.source!r} holds no conversation records")  # config checks rule it out


def open_files(path: Path) -> list:
    """(conversation, output file name) pairs from a JSON file, a folder of JSON files, or a JSONL file; each
    conversation in our history format or the Hugging Face / OpenAI `messages` form (`data/messages.py`)."""
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise schema.SchemaError(f"{path}: no *.json conversations in this folder")
        return [(messages.load_any(f), f.name) for f in files]
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise schema.SchemaError(f"{path}: conversation file not found")
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise schema.SchemaError(f"{where}: malformed JSON at column {e.colno}: {e.msg}") from None
            if messages.is_messages(d):
                conv = messages.conversation_from_messages(d, source=where, base_dir=path.parent, conv_id=f"line{n}")
            else:
                conv = schema_io.conversation_from_dict(d, source=where, base_dir=path.parent)
            schema.validate(conv)
            out.append((conv, schema_io.safe_name(conv.id or f"line{n}") + ".json"))
        if not out:
            raise schema.SchemaError(f"{path}: no conversations in this file")
        return out
    return [(messages.load_any(path), path.name)]


def kind(records: Sequence, i: int) -> str:
    """Record i's kind, from the source's index when it has one (array_record builds), else the record."""
    known = getattr(records, "kind", None)
    return known(i) if callable(known) else records[i].kind


def num_images(records: Sequence, i: int) -> int:
    """How many images record i holds (`schema.iter_images` order), without decoding it where the source knows."""
    known = getattr(records, "num_images", None)
    return known(i) if callable(known) else len(list(schema.iter_images(records[i])))


class KindSubset(Sequence):
    """The records of `records` whose kind is in `kinds` (all when empty), random access. Kinds come from the
    source's index when it has one, so building a subset reads no record."""

    def __init__(self, records: Sequence, kinds: Sequence[str] = ()):
        self._records = records
        wanted = set(kinds)
        self._index = [i for i in range(len(records)) if not wanted or kind(records, i) in wanted]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> schema.Conversation:
        return self._records[self._index[int(i)]]

    def kind(self, i: int) -> str:
        return kind(self._records, self._index[int(i)])

    def num_images(self, i: int) -> int:
        return num_images(self._records, self._index[int(i)])


class _Head(KindSubset):
    """The first `num` records of `records`."""

    def __init__(self, records: Sequence, num: int):
        self._records, self._index = records, list(range(min(num, len(records))))
