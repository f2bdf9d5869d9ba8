"""CLIP-T: prompt alignment of generated images with a local CLIP checkpoint (never downloaded).

Owns: `clip_t_score` (image / prompt pairs) and `round_clip_t` (each generated round against its user text);
without a usable checkpoint the result says 'skipped: <reason>' instead of raising.

Does not own: aligning generated rounds (`rounds.py`), the report (`metrics.py`).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from cig_jax.data.schema import Conversation
from cig_jax.eval.rounds import aligned, pixels_of


def _skipped(reason: str, message: str) -> dict:
    return {"status": f"skipped: {reason}", "mean": None, "n": 0, "scores": [], "message": message}


@functools.lru_cache(maxsize=2)
def _load_clip(path: str):
    import torch  # noqa: F401  (transformers' CLIP is a PyTorch model)
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def clip_t_score(images: Sequence, prompts: Sequence[str], clip_path: Union[str, Path, None] = None,
                 batch_size: int = 16) -> dict:
    """CLIP-T: cosine between CLIP's image and text embeddings of each (image, prompt) pair.

    `clip_path`: a local folder with a transformers CLIPModel checkpoint and its processor files (e.g. a
    saved openai/clip-vit-large-patch14). Nothing is downloaded: without a path, with a missing folder or
    one that does not load, the result is {"status": "skipped: <reason>", "mean": None, "message": ...}
    and nothing is raised. Prompts longer than CLIP's context are truncated. A None image is skipped.
    -> {"status": "ok", "mean", "n", "scores" (per pair, None for a missing image), "model"}."""
    how = ("save a CLIPModel and its CLIPProcessor (model.save_pretrained(DIR); processor.save_pretrained(DIR)) "
           "to a local folder and pass its path; cig_jax never downloads models")
    if clip_path is None:
        return _skipped("no CLIP checkpoint given", f"CLIP-T not computed: {how}.")
    path = Path(clip_path).expanduser()
    if not path.is_dir():
        return _skipped(f"CLIP checkpoint folder not found: {path}", f"CLIP-T not computed: {how}.")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    try:
        model, processor = _load_clip(str(path.resolve()))
    except Exception as e:  # a broken or partial checkpoint: report, never crash an evaluation
        return _skipped(f"cannot load CLIP from {path}: {type(e).__name__}: {e}", f"CLIP-T not computed: {how}.")
    import torch

    pixels = [pixels_of(im) for im in images]
    idx = [i for i, px in enumerate(pixels) if px is not None]
    scores: list = [None] * len(pixels)
    max_len = int(getattr(model.config.text_config, "max_position_embeddings", 77))
    for s in range(0, len(idx), batch_size):
        chunk = idx[s:s + batch_size]
        inputs = processor(text=[prompts[i] for i in chunk], images=[pixels[i] for i in chunk], return_tensors="pt",
                           padding=True, truncation=True, max_length=max_len)
        with torch.no_grad():
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                        pixel_values=inputs["pixel_values"])
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        for i, v in zip(chunk, (img * txt).sum(-1).tolist()):
            scores[i] = float(v)
    ok = [v for v in scores if v is not None]
    return {"status": "ok", "mean": float(np.mean(ok)) if ok else None, "n": len(ok), "scores": scores,
            "model": str(path)}


def round_clip_t(truth: Sequence[Conversation], generated, clip_path=None) -> dict:
    """CLIP-T of each generated round image against that round's user text."""
    pairs = [(g, rnd.user_text) for conv, gen in aligned(truth, generated) for rnd, g in zip(conv.rounds, gen)
             if g is not None and rnd.user_text]
    return clip_t_score([p[0] for p in pairs], [p[1] for p in pairs], clip_path)
