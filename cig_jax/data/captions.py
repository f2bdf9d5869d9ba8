"""Captioning the rounds of a video record: template texts, or a local transformers image-to-text model.

Owns: `Shot` (what a captioner knows about one round's image), the `Captioner` protocol, `TemplateCaptioner`,
`HFCaptioner` and `CaptionModelNotFoundError` (nothing is downloaded).
Does not own: choosing frames or people (`video.py`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import numpy as np
from PIL import Image as PILImage


class CaptionModelNotFoundError(FileNotFoundError):
    """A captioning model directory is not on local disk (nothing is downloaded)."""


# ----------------------------------------------------------------------------------------------------------
# Captioning
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Shot:
    """What a captioner knows about one round's assistant image."""

    pixels: np.ndarray  # [S, S, 3] uint8
    names: list  # who is in it, left to right
    new_names: list  # names this round introduces
    round_index: int
    rng: np.random.Generator  # phrasing choices, deterministic per clip


class Captioner(Protocol):
    def __call__(self, shot: Shot) -> tuple[str, str]:
        """-> (user_text, assistant_text) for the round."""
        ...


class TemplateCaptioner:
    """Texts from what the builder knows: the names, who is in the image, and left/right in round 1."""

    PAIR = ("Generate an image of {a} and {b} together.", "Show {a} and {b} side by side.",
            "Draw {a} together with {b}.")
    SOLO = ("Now show {a} alone.", "Generate an image of just {a}.", "Show me {a} on their own.")

    def __init__(self, pair: Sequence[str] = PAIR, solo: Sequence[str] = SOLO):
        self.pair, self.solo = tuple(pair), tuple(solo)

    def __call__(self, shot: Shot) -> tuple[str, str]:
        if len(shot.names) == 2:
            a, b = shot.names
            text = self.pair[int(shot.rng.integers(len(self.pair)))].format(a=a, b=b)
            if shot.new_names:
                text += f" {a} is on the left and {b} is on the right."
            return text, f"Here are {a} and {b}."
        (a,) = shot.names
        return self.solo[int(shot.rng.integers(len(self.solo)))].format(a=a), f"Here is {a}."


class HFCaptioner:
    """A local transformers image-to-text model (BLIP, GIT, ViT-GPT2...) describes each image; its caption is
    added to the template's user text. Never downloads: `path` must be a saved model directory."""

    def __init__(self, path: Union[str, Path], template: Optional[Captioner] = None, max_new_tokens: int = 30,
                 text_format: str = "{user} Scene: {caption}."):
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise CaptionModelNotFoundError(
                f"captioning model not found: {path} has no config.json. Save an image-to-text model there "
                "(e.g. `huggingface-cli download Salesforce/blip-image-captioning-base --local-dir DIR` on a "
                "machine with internet); cig_jax never downloads models.")
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        self._torch, local = torch, {"local_files_only": True}
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), **local).eval()
        proc = AutoProcessor.from_pretrained(str(path), **local)
        if hasattr(proc, "image_processor") and hasattr(proc, "batch_decode"):  # BLIP, GIT: one processor
            self.images, self.tokenizer = proc, proc
        else:  # ViT-GPT2 style: AutoProcessor gives only the tokenizer or only the image processor
            self.images = AutoImageProcessor.from_pretrained(str(path), **local)
            self.tokenizer = proc if hasattr(proc, "batch_decode") else AutoTokenizer.from_pretrained(str(path), **local)
        self.template = template or TemplateCaptioner()
        self.max_new_tokens, self.text_format = max_new_tokens, text_format

    def describe(self, pixels: np.ndarray) -> str:
        inputs = self.images(images=PILImage.fromarray(pixels), return_tensors="pt")
        with self._torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()

    def __call__(self, shot: Shot) -> tuple[str, str]:
        user, assistant = self.template(shot)
        caption = self.describe(shot.pixels).rstrip(".")
        return (self.text_format.format(user=user, caption=caption) if caption else user), assistant
