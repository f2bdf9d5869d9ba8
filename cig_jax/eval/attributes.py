"""Attribute classifier: reads one person's attributes (`synthetic.ATTRIBUTES`) from an image crop.

Owns: the small multi-head CNN (`AttributeCNN`), how a person becomes a classifier input (`person_crop`:
crop the box, letterbox it to a square with grey, resize), the training recipe on renderer output
(`train_classifier`), its on-disk cache with a renderer fingerprint (`load_or_train_classifier`), and
`attribute_accuracy`.

Does not own: the renderer or the vocabulary (`data/synthetic.py`), per-round metrics (`eval/metrics.py`).

Training data are synthetic conversations drawn through `synthetic.make_conversation` from a stream that
no dataset uses (seed `TRAIN_SEED_BASE + seed`): people alone, in two-person scenes and in portraits, at
64/96/128 pixels, cropped by their ground-truth boxes (jittered), and single-person images whole; with mild
augmentation (box jitter, colour gain, blur, noise). Held-out accuracy is measured on conversations from another
stream (`HELDOUT_SEED`) without augmentation and stored with the cache.

Cache layout (`<cache_dir>/attribute_classifier/`): `params.npz` (one array per parameter path) and
`meta.json` (attribute vocabulary, input size, seed, recipe version, renderer fingerprint, held-out
accuracy). The fingerprint hashes pixels of fixed probe renders plus the vocabulary, so any change to the
renderer that changes what it draws makes the cache stale and the classifier is retrained.

    clf = load_or_train_classifier("/tmp/out")             # ~2 min on 2 idle CPU cores the first time
    clf.predict([image.pixels], boxes=[person.box])          # -> [{"hair_color": "red", ...}]
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image as PILImage
from PIL import ImageFilter
from tqdm import tqdm

from cig_jax.data import synthetic
from cig_jax.data.schema import Image, iter_images

RECIPE_VERSION = 1  # bump when the model, crop or training recipe changes (invalidates caches)
CACHE_SUBDIR = "attribute_classifier"
TRAIN_SEED_BASE = 7_300_000  # training stream: make_conversation(kind, TRAIN_SEED_BASE + seed, index)
HELDOUT_SEED = 7_399_999  # held-out stream, never trained on
TRAIN_KINDS = ("name_based", "single_turn")  # pairs, solos and portraits
RENDER_SIZES = (64, 64, 64, 96, 128)  # drawn uniformly per conversation: mostly the dataset's 64
PAD_VALUE = 128  # letterbox colour
# Boxes are widened by this fraction of their width on each side: the renderer draws a ponytail partly
# outside the person's box (to the right of the head).
BOX_MARGIN = 0.12
BATCH = 64
# (output channels, stride, 2x2 max-pool after): 64 -> 32 -> 16 -> 8 -> 4 pixels, 4x4x64 features
CONV_LAYERS = ((16, 2, False), (32, 1, True), (64, 1, True), (64, 1, True))
HIDDEN = 128


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def _vocab(attributes: dict) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((k, tuple(v)) for k, v in attributes.items())


class AttributeCNN(nnx.Module):
    """[N, size, size, 3] float in [-1, 1] -> {attr: logits [N, len(values)]}.

    3x3 convs (`CONV_LAYERS`), a hidden layer, and one softmax head per attribute (one output matrix whose
    column slices are the heads)."""

    def __init__(self, vocab, size: int = 64, *, rngs: nnx.Rngs):
        if size % 16:
            raise ValueError(f"classifier input size must be a multiple of 16, got {size}")
        self.vocab = tuple((k, tuple(v)) for k, v in vocab)
        convs, cin, side = [], 3, size
        for cout, stride, pool in CONV_LAYERS:
            convs.append(nnx.Conv(cin, cout, (3, 3), strides=stride, rngs=rngs))
            cin, side = cout, side // stride // (2 if pool else 1)
        self.convs = nnx.List(convs)
        self.hidden = nnx.Linear(side * side * cin, HIDDEN, rngs=rngs)
        self.heads = nnx.Linear(HIDDEN, sum(len(v) for _, v in self.vocab), rngs=rngs)

    def __call__(self, x: jax.Array) -> dict:
        for conv, (_, _, pool) in zip(self.convs, CONV_LAYERS):
            x = jax.nn.relu(conv(x))
            if pool:
                x = nnx.max_pool(x, (2, 2), (2, 2))
        x = jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))  # [N, HIDDEN]
        logits = self.heads(x)  # [N, sum of vocabulary sizes]
        out, start = {}, 0
        for k, values in self.vocab:
            out[k] = logits[:, start:start + len(values)]
            start += len(values)
        return out


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------
def _pixels(image) -> np.ndarray:
    px = image.pixels if isinstance(image, Image) else image
    px = np.asarray(px)
    if px.dtype != np.uint8 or px.ndim != 3 or px.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 [H, W, 3] image, got {px.dtype} {px.shape}")
    return px


def person_crop(pixels: np.ndarray, box=None, size: int = 64, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The classifier's view of one person: `box` [x0, y0, x1, y1] (pixels, widened by BOX_MARGIN each side;
    None = the whole image, which must then show one person) cropped, padded to a square with grey (aspect
    kept), resized to `size`.
    With `rng` the box is jittered and the crop mildly augmented (training only). -> [size, size, 3] uint8."""
    pixels = _pixels(pixels)
    h, w = pixels.shape[:2]
    if box is None:
        x0, y0, x1, y1 = 0.0, 0.0, float(w), float(h)
    else:
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, x1 = x0 - BOX_MARGIN * (x1 - x0), x1 + BOX_MARGIN * (x1 - x0)
    if rng is not None:
        bw, bh = x1 - x0, y1 - y0
        x0, x1 = x0 + rng.uniform(-0.04, 0.04) * bw, x1 + rng.uniform(-0.04, 0.04) * bw
        y0, y1 = y0 + rng.uniform(-0.04, 0.04) * bh, y1 + rng.uniform(-0.04, 0.04) * bh
    x0, y0 = int(round(min(max(x0, 0), w - 1))), int(round(min(max(y0, 0), h - 1)))
    x1, y1 = int(round(min(max(x1, x0 + 1), w))), int(round(min(max(y1, y0 + 1), h)))
    crop = pixels[y0:y1, x0:x1]
    ch, cw = crop.shape[:2]
    side = max(ch, cw)
    square = np.full((side, side, 3), PAD_VALUE, np.uint8)
    top, left = (side - ch) // 2, (side - cw) // 2
    square[top:top + ch, left:left + cw] = crop
    im = PILImage.fromarray(square).resize((size, size), PILImage.BILINEAR)
    if rng is None:
        return np.asarray(im, dtype=np.uint8)
    if rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    x = np.asarray(im, dtype=np.float32)  # no flips: the renderer puts a ponytail on the right only
    x = x * rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, size=3) + rng.uniform(-8, 8)
    x = x + rng.normal(0.0, rng.uniform(0.0, 4.0), size=x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _to_input(crops: np.ndarray) -> jax.Array:
    return jnp.asarray(crops, jnp.float32) / 127.5 - 1.0  # [N, size, size, 3]


def conversation_samples(conv, size: int, rng: Optional[np.random.Generator] = None,
                         whole_prob: float = 1.0) -> Iterator[tuple[np.ndarray, dict]]:
    """(crop, ground-truth attributes) for every person with a box in every image of `conv`, plus the whole
    image for single-person images (with probability `whole_prob` when `rng` is given)."""
    for _, img in iter_images(conv):
        people = [p for p in img.people if p.box is not None and all(k in p.attributes for k in synthetic.ATTRIBUTES)]
        for p in people:
            yield person_crop(img.pixels, p.box, size, rng), p.attributes
        if len(img.people) == 1 and people and (rng is None or rng.random() < whole_prob):
            yield person_crop(img.pixels, None, size, rng), people[0].attributes


def heldout_set(size: int = 64, num_conversations: int = 240, render_size: int = 64):
    """Held-out ground-truth renders (no augmentation): crops [N, size, size, 3] uint8 and attribute dicts."""
    crops, truth = [], []
    for i in range(num_conversations):
        conv = synthetic.make_conversation(TRAIN_KINDS[i % len(TRAIN_KINDS)], HELDOUT_SEED, i, render_size)
        for c, a in conversation_samples(conv, size):
            crops.append(c)
            truth.append(a)
    return np.stack(crops), truth


def _label_array(truth: Sequence[dict], vocab) -> np.ndarray:
    return np.array([[values.index(a[k]) for k, values in vocab] for a in truth], np.int32)  # [N, A]


def _training_batches(seed: int, size: int, vocab) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless deterministic batches: chunks of ~512 fresh samples, shuffled, cut into batches of BATCH."""
    rng = np.random.default_rng([TRAIN_SEED_BASE, seed])
    index = 0
    leftover_x, leftover_y = [], []
    while True:
        xs, ys = list(leftover_x), list(leftover_y)
        while len(xs) < 512:
            kind = TRAIN_KINDS[index % len(TRAIN_KINDS)]
            render = int(RENDER_SIZES[rng.integers(len(RENDER_SIZES))])
            conv = synthetic.make_conversation(kind, TRAIN_SEED_BASE + seed, index, render)
            index += 1
            for c, a in conversation_samples(conv, size, rng, whole_prob=0.6):
                xs.append(c)
                ys.append(a)
        order = rng.permutation(len(xs))
        x, y = np.stack(xs)[order], _label_array(ys, vocab)[order]
        n = (len(xs) // BATCH) * BATCH
        leftover_x, leftover_y = [xs[i] for i in order[n:]], [ys[i] for i in order[n:]]
        for s in range(0, n, BATCH):
            yield x[s:s + BATCH], y[s:s + BATCH]


def _prefetch(it: Iterator, depth: int = 4) -> Iterator:
    """Runs `it` in a thread (order kept, so deterministic) to overlap rendering with the jitted step."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def work():
        for item in it:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            yield q.get()
    finally:
        stop.set()


# ----------------------------------------------------------------------------------------------------------
# Classifier
# ----------------------------------------------------------------------------------------------------------
class AttributeClassifier:
    """A trained `AttributeCNN` with its vocabulary. `meta` holds what the cache's meta.json holds."""

    def __init__(self, model: AttributeCNN, size: int, meta: Optional[dict] = None):
        self.model, self.size, self.meta = model, int(size), dict(meta or {})
        self.vocab = model.vocab
        self.attributes = [k for k, _ in self.vocab]
        graphdef, state = nnx.split(model)
        self._state = state

        @jax.jit
        def probs(state, x):
            return {k: jax.nn.softmax(v, axis=-1) for k, v in nnx.merge(graphdef, state)(x).items()}

        self._probs = probs

    def predict_proba_crops(self, crops: np.ndarray) -> dict:
        """[N, size, size, 3] uint8 crops -> {attr: probabilities [N, len(values)]} (numpy)."""
        crops = np.asarray(crops, np.uint8)
        n = len(crops)
        out = {k: [] for k in self.attributes}
        for s in range(0, n, 256):
            chunk = crops[s:s + 256]
            pad = 256 - len(chunk) if n > 256 else (-len(chunk)) % 16  # few distinct shapes -> few compiles
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.uint8)])
            p = self._probs(self._state, _to_input(chunk))
            for k in self.attributes:
                out[k].append(np.asarray(p[k])[:len(chunk) - pad])
        sizes = dict(self.vocab)
        return {k: np.concatenate(v) if v else np.zeros((0, len(sizes[k])), np.float32) for k, v in out.items()}

    def predict_crops(self, crops: np.ndarray) -> list[dict]:
        probs = self.predict_proba_crops(crops)
        idx = {k: np.argmax(p, axis=-1) for k, p in probs.items()}
        return [{k: values[int(idx[k][i])] for k, values in self.vocab} for i in range(len(crops))]

    def predict(self, images, boxes: Optional[Sequence] = None) -> list[dict]:
        """Attributes of one person per image. `images`: RGB uint8 [H, W, 3] arrays or schema Images (or an
        [N, H, W, 3] array); `boxes`: None (each image shows one person, used whole) or one [x0, y0, x1, y1]
        pixel box (or None) per image. -> [{attr: value}] in `images` order."""
        images = list(images)
        if boxes is None:
            boxes = [None] * len(images)
        if len(boxes) != len(images):
            raise ValueError(f"got {len(images)} images but {len(boxes)} boxes")
        if not images:
            return []
        crops = np.stack([person_crop(im, b, self.size) for im, b in zip(images, boxes)])
        return self.predict_crops(crops)


def attribute_accuracy(pred: Sequence[dict], truth: Sequence[dict], attrs: Optional[Sequence[str]] = None) -> dict:
    """Per-attribute accuracy {attr: fraction correct} over aligned lists of attribute dicts; `attrs` defaults
    to every attribute of `synthetic.ATTRIBUTES`. An attribute missing from a truth dict is not counted;
    one with no counted items maps to None."""
    if len(pred) != len(truth):
        raise ValueError(f"got {len(pred)} predictions but {len(truth)} ground-truth entries")
    attrs = list(synthetic.ATTRIBUTES) if attrs is None else list(attrs)
    out = {}
    for k in attrs:
        pairs = [(p.get(k), t[k]) for p, t in zip(pred, truth) if k in t]
        out[k] = (sum(a == b for a, b in pairs) / len(pairs)) if pairs else None
    return out


# ----------------------------------------------------------------------------------------------------------
# Training and cache
# ----------------------------------------------------------------------------------------------------------
def renderer_fingerprint() -> str:
    """sha256 of the vocabulary and of pixels from fixed probe renders (every attribute value, pairs,
    solos, portraits, every scene): it changes exactly when the renderer draws differently."""
    h = hashlib.sha256()
    h.update(json.dumps({"attributes": synthetic.ATTRIBUTES, "scenes": synthetic.SCENES, "recipe": RECIPE_VERSION},
                        sort_keys=True).encode())
    for i in range(4):
        conv = synthetic.make_conversation(TRAIN_KINDS[i % 2], HELDOUT_SEED + 1, i, 64)
        for img in [r.assistant_image for r in conv.rounds] + [u for r in conv.rounds for u in r.user_images]:
            h.update(img.pixels.tobytes())
            h.update(json.dumps([(p.attributes, p.box) for p in img.people], sort_keys=True, default=list).encode())
    keys = list(synthetic.ATTRIBUTES)
    longest = max(len(v) for v in synthetic.ATTRIBUTES.values())
    for j in range(longest):  # person j wears value j (mod count) of every attribute
        a = {k: synthetic.ATTRIBUTES[k][j % len(synthetic.ATTRIBUTES[k])] for k in keys}
        scene = synthetic.SCENES[j % len(synthetic.SCENES)]
        h.update(synthetic.render_person(a, 64, scene).pixels.tobytes())
    return h.hexdigest()[:16]


def _flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    _, state = nnx.split(model)
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def _load_flat_params(model: nnx.Module, flat: dict) -> None:
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    new = []
    for path, v in leaves:
        key = jax.tree_util.keystr(path)
        if key not in flat or flat[key].shape != v.shape:
            raise ValueError(f"cached classifier parameter {key} missing or of the wrong shape")
        new.append(jnp.asarray(flat[key]))
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))


def train_classifier(size: int = 64, seed: int = 0, steps: int = 1000, lr: float = 3e-3,
                     log_every: int = 0, progress: bool = False) -> AttributeClassifier:
    """Trains an `AttributeClassifier` on fresh renders (deterministic given `seed`); `progress` shows a bar."""
    vocab = _vocab(synthetic.ATTRIBUTES)
    model = AttributeCNN(vocab, size, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps, lr * 0.01)
    tx = optax.adam(schedule)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        losses = [optax.softmax_cross_entropy_with_integer_labels(logits[k], y[:, i]).mean()
                  for i, (k, _) in enumerate(vocab)]
        return sum(losses) / len(losses)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.time()
    batches = _prefetch(_training_batches(seed, size, vocab))
    bar = tqdm(total=steps, desc="attribute classifier (once)", unit="step", disable=not progress)
    for i in range(steps):
        x, y = next(batches)
        params, opt_state, loss = step(params, opt_state, _to_input(x), jnp.asarray(y))
        bar.update(1)
        if log_every and (i + 1) % log_every == 0:
            if progress:
                bar.set_postfix(loss=f"{float(loss):.4f}")
            else:
                print(f"attribute classifier step {i + 1}/{steps} loss {float(loss):.4f} ({time.time() - t0:.0f}s)",
                      flush=True)
    bar.close()
    batches.close()
    nnx.update(model, params)
    return AttributeClassifier(model, size, {"train_seconds": round(time.time() - t0, 1), "steps": steps})


def evaluate_heldout(clf: AttributeClassifier, num_conversations: int = 240) -> dict:
    """Per-attribute accuracy on held-out ground-truth renders at the dataset's 64 pixels."""
    crops, truth = heldout_set(clf.size, num_conversations)
    return attribute_accuracy(clf.predict_crops(crops), truth, clf.attributes)


def load_or_train_classifier(cache_dir: Union[str, Path], size: int = 64, seed: int = 0,
                             steps: int = 1000, verbose: bool = False) -> AttributeClassifier:
    """The classifier cached under `<cache_dir>/attribute_classifier/`, trained (and cached) first when the
    cache is missing or stale (other vocabulary, size, seed, steps, recipe or renderer fingerprint)."""
    folder = Path(cache_dir) / CACHE_SUBDIR
    vocab = _vocab(synthetic.ATTRIBUTES)
    want = {"recipe_version": RECIPE_VERSION, "renderer_fingerprint": renderer_fingerprint(), "size": int(size),
            "seed": int(seed), "steps": int(steps), "attributes": {k: list(v) for k, v in vocab}}
    meta_path, params_path = folder / "meta.json", folder / "params.npz"
    if meta_path.is_file() and params_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if all(meta.get(k) == v for k, v in want.items()):
                model = AttributeCNN(vocab, size, rngs=nnx.Rngs(seed))
                with np.load(params_path) as f:
                    _load_flat_params(model, dict(f))
                return AttributeClassifier(model, size, meta)
            if verbose:
                print(f"attribute classifier cache {folder} is stale; retraining", flush=True)
        except (ValueError, OSError, json.JSONDecodeError) as e:
            if verbose:
                print(f"attribute classifier cache {folder} unreadable ({e}); retraining", flush=True)
    if verbose:
        print(f"[eval] training the attribute classifier once ({steps} steps on fresh synthetic renders; the default "
              f"1000 take about 5 minutes on 2 CPU cores); it is cached in {folder} and reused by every later evaluation", flush=True)
    clf = train_classifier(size, seed, steps, log_every=100 if verbose else 0, progress=verbose)
    meta = dict(want, train_seconds=clf.meta["train_seconds"], heldout_accuracy=evaluate_heldout(clf))
    clf.meta = meta
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".params.{os.getpid()}.npz"
    np.savez(tmp, **_flat_params(clf.model))
    os.replace(tmp, params_path)
    tmp = folder / f".meta.{os.getpid()}.json"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, meta_path)
    if verbose:
        print(f"attribute classifier trained in {meta['train_seconds']}s; held-out accuracy "
              f"{json.dumps(meta['heldout_accuracy'])}; cached in {folder}", flush=True)
    return clf
