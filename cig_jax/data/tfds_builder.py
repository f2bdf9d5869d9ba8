"""TFDS builder 'cig_conversations': conversations -> array_record files, and random-access reads back.

Owns: the record layout, building a dataset (`build_dataset`) from the synthetic generator or a folder of
conversation JSON files, and reading records back as schema Conversations (`load_records`). Works without
TensorFlow: array_record files are written by tfds' numpy path and read with `as_data_source`.

Does not own: the conversation format (`schema.py`), tokenization or batching (`pipeline.py`).

One record per conversation:
    id            Text   the conversation id
    conversation  Text   the conversation JSON (schema.to_dict) with every image `path` set to null; each
                         person's identity embedding and its backend ride in it (`people[].identity`)
    images        Sequence(Image png)   every image in `schema.iter_images` order, [H, W, 3] uint8 on read

Per split, the builder's metadata (`dataset_info` folder, `metadata.json`) lists every record's `kind` and
image count in record order, so readers select records by kind and count images without decoding any record
(`ConversationRecords.kind`, `.num_images`).

Splits: 'train' and 'validation'. Synthetic: train is records 0..num_train-1 of `seed`, validation records
VAL_START.. of the same seed (so the validation set does not move when num_train changes). Directory: the
`num_val` files with the smallest crc32(seed, relative path) are validation, the rest train (at most
`num_train` when given). Records keep generation order (shuffling is grain's job).

The builder class is not put in tfds' global registry; read with `load_records` or
`tfds.builder_from_directory(<data_dir>/cig_conversations/<config>/<version>)`.

CLI: python -m cig_jax.data.tfds_builder --data-dir /tmp/cig_tfds [--source synthetic|DIR] --num-train 1000 --num-val 100
"""
from __future__ import annotations

from cig_jax import cli
import dataclasses
import json
import shutil
import zlib
from pathlib import Path
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cig_jax.data import synthetic
from cig_jax.data.schema import Conversation, encode_png, iter_images, SchemaError, validate, with_pixels
from cig_jax.data.schema_io import conversation_from_dict, load_conversation, to_dict

NAME = "cig_conversations"
VERSION = "1.3.0"  # 1.1.0: per-record kind and image count in the metadata; 1.2.0: people carry their identity embeddings (`Person.identity`); 1.3.0: the recall kind joins the default kinds
VAL_START = 1_000_000_000  # synthetic validation records start at this index


@dataclasses.dataclass(eq=False)
class CigConversationsConfig(tfds.core.BuilderConfig):
    """Where records come from. `source`: 'synthetic' or a folder searched recursively for *.json."""

    source: str = "synthetic"
    num_train: Optional[int] = 1000  # directory source: None = all files not in validation
    num_val: int = 100
    seed: int = 0
    size: int = 64  # synthetic only
    kinds: tuple = synthetic.KINDS  # synthetic only


def make_config(source: str = "synthetic", num_train: Optional[int] = 1000, num_val: int = 100, seed: int = 0,
                size: int = 64, kinds: Sequence[str] = synthetic.KINDS) -> CigConversationsConfig:
    """A config whose name encodes its parameters, so different builds live side by side in one data_dir."""
    kinds = tuple(kinds)
    if source == "synthetic":
        name = f"synthetic_s{seed}_n{num_train}_v{num_val}_{size}px"
        if kinds != synthetic.KINDS:
            name += f"_k{zlib.crc32(','.join(kinds).encode()):08x}"
        desc = f"synthetic conversations, seed {seed}, {size}px, kinds {', '.join(kinds)}"
    else:
        folder = Path(source).resolve()
        name = f"dir_{_safe(folder.name)}_{zlib.crc32(str(folder).encode()):08x}_s{seed}_n{num_train}_v{num_val}"
        desc = f"conversations from {folder}"
    return CigConversationsConfig(name=name, version=VERSION, description=desc, source=source, num_train=num_train,
                                  num_val=num_val, seed=seed, size=size, kinds=kinds)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)[:40] or "dir"


class CigConversations(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Multi-round interleaved text+image conversations with ground-truth people attributes."""

    VERSION = tfds.core.Version(VERSION)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds' own lookup needs the `importlib_resources` backport for builders inside a package; this
        # file's path is all it wants (it looks for a checksums file beside it; there is none).
        return epath.Path(__file__)

    BUILDER_CONFIGS = [make_config(num_train=1000, num_val=100)]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n")[0],
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "conversation": tfds.features.Text(),
                "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format="png")),
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        if cfg.source == "synthetic":
            if cfg.num_train is None:
                raise ValueError("synthetic source needs num_train (an integer)")
            return {
                "train": self._generate_examples("train", indices=(0, cfg.num_train)),
                "validation": self._generate_examples("validation", indices=(VAL_START, cfg.num_val)),
            }
        train, val = _split_files(Path(cfg.source), cfg.num_train, cfg.num_val, cfg.seed)
        return {"train": self._generate_examples("train", files=train),
                "validation": self._generate_examples("validation", files=val)}

    def _generate_examples(self, split: str, indices=None, files=None):
        cfg = self.builder_config
        index = {"kind": [], "num_images": []}  # record k's kind and image count, in record order
        self.info.metadata[split] = index
        if indices is not None:
            start, num = indices
            convs = synthetic.generate(num, cfg.seed, cfg.kinds, cfg.size, start=start)
        else:
            convs = (_load_file(f) for f in files)
        for k, conv in enumerate(convs):
            index["kind"].append(conv.kind)
            index["num_images"].append(len(list(iter_images(conv))))
            yield k, conversation_to_example(conv)


def _load_file(f: Path) -> Conversation:
    conv = with_pixels(load_conversation(f, check_images=False))
    validate(conv)  # pixels are in memory now: checks boxes against image sizes without rereading
    return conv


def _split_files(folder: Path, num_train: Optional[int], num_val: int, seed: int):
    if not folder.is_dir():
        raise SchemaError(f"{folder}: conversation folder not found")
    files = sorted(p for p in folder.rglob("*.json") if p.is_file())
    if not files:
        raise SchemaError(f"{folder}: no *.json conversation files found (searched recursively)")
    order = sorted(files, key=lambda p: (zlib.crc32(f"{seed}:{p.relative_to(folder).as_posix()}".encode()), str(p)))
    val = set(order[:num_val])
    train = [p for p in files if p not in val]
    if num_train is not None:
        train = train[:num_train]
    return train, [p for p in files if p in val]


# ----------------------------------------------------------------------------------------------------------
# Record <-> Conversation
# ----------------------------------------------------------------------------------------------------------
def conversation_to_example(conv: Conversation) -> dict:
    """A Conversation with pixels on every image -> the feature dict of one record."""
    images, paths = [], {}
    for where, im in iter_images(conv):
        if im.pixels is None:
            raise SchemaError(f"conversation {conv.id!r}: {where}: pixels not loaded (use schema.with_pixels)")
        images.append(encode_png(im.pixels))
        paths[where] = None
    text = json.dumps(to_dict(conv, image_paths=paths), ensure_ascii=False, separators=(",", ":"))
    return {"id": conv.id, "conversation": text, "images": images}


def example_to_conversation(example: dict) -> Conversation:
    """One decoded record (as `as_data_source` returns it) -> a Conversation with in-memory pixels."""
    cid = _text(example["id"])
    conv = conversation_from_dict(json.loads(_text(example["conversation"])), source=f"record {cid!r}")
    images = list(example["images"])
    slots = list(iter_images(conv))
    if len(slots) != len(images):
        raise SchemaError(f"record {cid!r}: conversation has {len(slots)} images but the record stores {len(images)}")
    for (_, im), px in zip(slots, images):
        im.pixels = np.asarray(px, dtype=np.uint8)
    return conv


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class ConversationRecords(Sequence):
    """Random access to one split as Conversations: len(), [i]; `kind(i)` and `num_images(i)` from the build's
    metadata (no record read). Picklable (grain workers can hold it)."""

    def __init__(self, data_source, index: dict):
        self._source = data_source
        self._kinds, self._num_images = list(index["kind"]), [int(n) for n in index["num_images"]]
        if len(self._kinds) != len(data_source) or len(self._num_images) != len(data_source):
            raise ValueError(f"the build's metadata lists {len(self._kinds)} records, the split holds "
                             f"{len(data_source)}: rebuild the dataset")

    def kind(self, i: int) -> str:
        return self._kinds[int(i)]

    def num_images(self, i: int) -> int:
        return self._num_images[int(i)]

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> Conversation:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"record index must be an integer, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for a split of {n}")
        return example_to_conversation(self._source[int(i) % n])

    def raw(self, i: int) -> dict:
        """The decoded record dict (id, conversation JSON text, images) without building a Conversation."""
        return self._source[int(i)]


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------
def build_dataset(data_dir: Union[str, Path], source: str = "synthetic", num_train: Optional[int] = 1000,
                  num_val: int = 100, seed: int = 0, size: int = 64, kinds: Sequence[str] = synthetic.KINDS,
                  overwrite: bool = False) -> CigConversations:
    """Builds (or reuses, unless `overwrite`) array_record files under data_dir/cig_conversations/<config>/.
    `source`: 'synthetic' or a folder of conversation JSON files. Returns the prepared builder."""
    cfg = make_config(source, num_train, num_val, seed, size, kinds)
    if cfg.name in {c.name for c in CigConversations.BUILDER_CONFIGS}:
        cfg = cfg.name  # tfds refuses a custom config object named like a built-in one; the name selects it
    builder = CigConversations(data_dir=str(data_dir), config=cfg, file_format="array_record")
    if overwrite and Path(builder.data_dir).exists():
        shutil.rmtree(builder.data_dir)
        builder = CigConversations(data_dir=str(data_dir), config=cfg, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return builder


def dataset_dir(data_dir: Union[str, Path], config: Optional[str] = None) -> epath.Path:
    """The prepared folder data_dir/cig_conversations/<config>/<version>; `config` may be omitted when
    data_dir holds exactly one build."""
    root = epath.Path(data_dir) / NAME  # local or remote (gs://...)
    if config is None:
        found = sorted(p.parent.parent.name for p in root.glob(f"*/{VERSION}/dataset_info.json"))
        if len(found) != 1:
            what = "no build" if not found else f"{len(found)} builds ({', '.join(found)}); pass config="
            raise FileNotFoundError(f"{root}: {what} (run cig_jax.data.tfds_builder.build_dataset first)")
        config = found[0]
    path = root / config / VERSION
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(f"{path}: no prepared dataset there (run cig_jax.data.tfds_builder.build_dataset)")
    return path


def load_records(data_dir: Union[str, Path], split: str = "train", config: Optional[str] = None) -> ConversationRecords:
    """Split `split` ('train' or 'validation') as a random-access sequence of Conversations with pixels."""
    builder = tfds.builder_from_directory(str(dataset_dir(data_dir, config)))
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {sorted(builder.info.splits)}")
    index = builder.info.metadata.get(split) if builder.info.metadata else None
    if index is None:
        raise ValueError(f"{dataset_dir(data_dir, config)}: no per-record metadata for split {split!r} (a build "
                         "older than version 1.1.0?): rebuild the dataset")
    return ConversationRecords(builder.as_data_source(split=split), index)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = cli.parser(cli.prog(module="cig_jax.data.tfds_builder"), "Build the cig_conversations array_record dataset.")
    ap.add_argument("--data-dir", required=True, help="the TFDS data directory to build under")
    ap.add_argument("--source", default="synthetic", help="'synthetic' or a folder of conversation JSON files")
    ap.add_argument("--num-train", type=int, default=1000, help="synthetic: training conversations")
    ap.add_argument("--num-val", type=int, default=100, help="synthetic: validation conversations")
    ap.add_argument("--seed", type=int, default=0, help="synthetic: the draw's seed")
    ap.add_argument("--size", type=int, default=64, help="synthetic: side of the square images, in pixels")
    ap.add_argument("--overwrite", action="store_true", help="rebuild a build that already exists")
    args = ap.parse_args(argv)
    if args.source != "synthetic" and not Path(args.source).is_dir():
        raise FileNotFoundError(f"--source {args.source}: conversation folder not found")
    b = build_dataset(args.data_dir, args.source, args.num_train, args.num_val, args.seed, args.size, overwrite=args.overwrite)
    print(f"built {b.data_dir}: " + ", ".join(f"{k}={v.num_examples}" for k, v in b.info.splits.items()))


if __name__ == "__main__":
    cli.run_main(main)
