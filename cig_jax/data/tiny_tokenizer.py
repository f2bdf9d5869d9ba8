"""The tiny offline tokenizer: a byte-level BPE trained here, on a fixed corpus made from the synthetic dataset's
vocabulary and a chat format's markup, for the tests and the tiny-LLM demo (no tokenizer download).

Owns: the corpus (`tiny_corpus`) and the tokenizer (`build_tiny_tokenizer`, cached by a hash of corpus and size).

Does not own: the MLLM's special tokens it gets (`chat_template.add_mllm_tokens`), the chat formats
(`chat_formats.py`), how a conversation becomes tokens (`chat_template.py`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from cig_jax.data import chat_formats, world
from cig_jax.data.chat_formats import LLAMA2
from cig_jax.data.chat_template import add_mllm_tokens, mllm_special_tokens

_WORDS = """the a an and or but of to in on at by for with from into onto over under near next is are was were be
been being have has had do does did can could will would should may might must this that these those here there
it its they them their he him his she her we us our you your i me my who what which where when why how please
now then again also too very more less same other another first second third last previous earlier later new
old both each one two three all some any no not yes ok sure certainly of course thanks thank picture image photo
drawing painting illustration portrait scene background person people man woman face hair eyes skin shirt hat
glasses wears wearing has having keep keeps keeping stay stays show shows showing draw drew drawn make made
change changed give gave take took off put move moved turn turned replace replaced add added remove removed undo
redo go back version edit edits standing sitting smiling together side left right front behind inside outside
day sunset sunny cold warm bright dark colour color colors style short long round oval square light medium tan
look looks like same as before see""".split()
_TEMPLATES = [
    "Draw {a} and {b} {scene}.", "Here are {a} and {b}.", "Here is {a} {scene}.", "Now show {a} {scene}.",
    "{a} has {color} hair and wears a {color2} shirt.", "{a} has a {shape} face and {tone} skin.",
    "{a} has {eyes} eyes and {style} hair.", "{a} wears glasses.", "{a} wears a hat.", "Give {a} glasses.",
    "Give {a} a hat.", "Take off {a}'s hat.", "Take off {a}'s glasses.", "Change {a}'s shirt to {color}.",
    "Make {a}'s hair {color}.", "Move {a} to the {scene_word}.", "Move {a} into the snow.", "Undo the last change.",
    "Undo the last two changes.", "Go back to the first version.", "Here is the edited picture.",
    "Sure, here is a picture of {a}.", "I have drawn {a} and {b} {scene}.", "Keep {a}'s {color} shirt.",
    "Put {a} in a photo studio.", "Show {b} outside at night.", "{a} and {b} are standing together {scene}.",
]
_SCENE_PHRASES = ["at the beach", "in the park", "in an office", "outside at night", "in the snow",
                  "in a photo studio"]


def _vocabulary() -> dict:
    """Names, attributes and scenes of the synthetic dataset."""
    return dict(names=list(world.NAMES), attributes={k: list(v) for k, v in world.ATTRIBUTES.items()},
                scenes=list(world.SCENES))


def tiny_corpus(vocab: Optional[dict] = None, chat_format: str = "llama2") -> list[str]:
    """A fixed, deterministic corpus of chat lines over the synthetic vocabulary, with the format's chat markup
    (its special tokens left out: they are special tokens of the tokenizer)."""
    fmt = chat_formats.chat_format(chat_format)
    v = vocab or _vocabulary()
    names, att, scenes = v["names"], v["attributes"], v["scenes"]
    colors = sorted(set(att["hair_color"]) | set(att["clothing_color"]))
    lines = [" ".join(_WORDS), " ".join(_WORDS).capitalize() + "."]
    lines += [" ".join(vals) for vals in att.values()] + [" ".join(scenes), " ".join(names)]
    for i, name in enumerate(names):
        for j, t in enumerate(_TEMPLATES):
            k = i * len(_TEMPLATES) + j
            lines.append(t.format(
                a=name, b=names[(i + j + 1) % len(names)], scene=_SCENE_PHRASES[k % len(_SCENE_PHRASES)],
                scene_word=scenes[k % len(scenes)], color=colors[k % len(colors)],
                color2=colors[(k * 7 + 3) % len(colors)], shape=att["face_shape"][k % len(att["face_shape"])],
                tone=att["skin_tone"][k % len(att["skin_tone"])], eyes=att["eye_color"][k % len(att["eye_color"])],
                style=att["hair_style"][k % len(att["hair_style"])]))
    # chat markup as the template writes it
    lines += [fmt.text("user_open") + lines[-1 - i] + fmt.text("user_close") + lines[-2 - i] + fmt.text("round_end")
              + fmt.text("user_open_next") for i in range(0, 200, 2)]
    return lines + ([fmt.text("start")] if fmt.text("start") else [])  # chatml: its system turn


def build_tiny_tokenizer(cache_dir: str | Path, vocab_size: int = 1024, chat_format: str = "llama2"):
    """A small byte-level BPE trained on `tiny_corpus()`, wrapped as a `transformers.PreTrainedTokenizerFast`
    with <s>, </s>, <unk>, <pad> and the MLLM tokens. `vocab_size` is the total size (special tokens included).
    For chat_format 'chatml': trained on ChatML markup, with <|im_start|> (bos), <|im_end|> (eos and pad, as
    SmolLM2's) and <unk> instead.

    Deterministic: the trained tokenizer is cached under `cache_dir/tiny-<hash of corpus and size>/` and reused.
    Byte-level, so `decode(encode(text)) == text` for any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fmt = chat_formats.chat_format(chat_format)
    corpus = tiny_corpus(chat_format=fmt.name)
    bos, eos, pad = fmt.tiny_tokens
    trained = list(dict.fromkeys(["<unk>", bos, eos, pad]))  # the BPE's own special tokens
    n_special = len(mllm_special_tokens())
    base = vocab_size - n_special
    if base < 256 + 4 + 16:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for BPE merges next to {n_special} MLLM tokens "
                         f"and 256 bytes; use at least {n_special + 276}")
    key = hashlib.sha1(json.dumps([corpus, vocab_size, 1] + ([trained] if fmt is not LLAMA2 else [])).encode()
                       ).hexdigest()[:12]
    path = Path(cache_dir) / f"tiny-{key}"
    file = path / "tokenizer.json"
    if not file.is_file():
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=base, special_tokens=trained,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(corpus, trainer=trainer)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".tokenizer.{os.getpid()}.json"  # write, then rename: concurrent builders never see half a file
        tok.save(str(tmp))
        tmp.replace(file)
    out = PreTrainedTokenizerFast(tokenizer_file=str(file), bos_token=bos, eos_token=eos, unk_token="<unk>",
                                  pad_token=pad, clean_up_tokenization_spaces=False)
    add_mllm_tokens(out)
    return out
