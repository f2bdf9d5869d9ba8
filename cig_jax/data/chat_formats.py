"""The chat formats a conversation can be laid out in: one table, read by the chat template and by the export.

Owns: `ChatFormat` (the layout strings of one format, the special tokens it names, how a round ends at sampling
time, and its Jinja `chat_template` for exported tokenizers) and `FORMATS` (`model.mllm.chat_format` -> format):
  * 'llama2': LLaMA-2 chat as SEED-X writes it (the default; what every earlier run was trained on)

        <s>[INST] {user} [/INST]\\n{answer}{image}\\n[INST] {user} [/INST]\\n{answer}</s>

    A round that is not the last ends with nothing: sampling stops a round when the model writes `</s>` (never fed
    back) or the next turn's "\\n[INST]" (the turn marker, dropped).
  * 'chatml': ChatML as SmolLM2-Instruct writes it, with the default system turn SmolLM2's own template inserts
    when a conversation gives none (so `ChatTemplate.render` of a text-only chat equals what the released
    tokenizer's template renders; a conversation here has no system turn of its own)

        <|im_start|>system\\n{SMOLLM2_SYSTEM}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n
        <|im_start|>assistant\\n{answer}{image}<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n

    Every answered round ends with `<|im_end|>` (a target: the model learns to end its answer) and "\\n", and
    both belong to the history the next round reads: sampling stops a round at `<|im_end|>` and feeds it (with the
    "\\n") before the next user turn. `<|im_start|>` never occurs in an answer (sampling bans it).

In the layout strings "{bos}" and "{eos}" stand for the format's bos / eos tokens (for 'llama2': the tokenizer's
own, e.g. `<s>` / `</s>`); everything else is text. Where a `{eos}` closes a round it is a target (loss 1).

Does not own: tokenizing a layout, image blocks, loss masks (`chat_template.py`); the sampling loop
(`cig_jax/sample/`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """One chat layout. Strings may hold "{bos}" / "{eos}" (the format's special tokens); the rest is text."""

    name: str
    about: str  # for people (the exported model card)
    start: str  # opens the conversation (round 0); always begins with {bos}
    user_open: str  # before the first round's user turn
    user_open_next: str  # before every later round's user turn
    user_close: str  # after a user turn: the generation prompt ends here
    round_end: str  # after every answered round (fed back at sampling time)
    conversation_end: str  # after the last answered round in training only (predicted, never fed back)
    jinja: str  # the Hugging Face `chat_template` of the exported tokenizer (text-only turns)
    bos: Optional[str] = None  # the bos / eos token strings; None: the tokenizer's own bos / eos
    eos: Optional[str] = None
    turn_marker: bool = False  # a round also ends when the model writes how the next turn opens (text-only turns)
    tiny_tokens: tuple = ("<s>", "</s>", "<pad>")  # bos, eos, pad of the tiny offline tokenizer for this format

    LAYOUT = ("start", "user_open", "user_open_next", "user_close", "round_end", "conversation_end")
    TARGETS = ("round_end", "conversation_end")  # the layout strings whose {eos} is a target

    def pieces(self, field: str) -> list[str]:
        """The layout string `field` split into "{bos}", "{eos}" and text pieces, in order."""
        return [p for p in re.split(r"(\{bos\}|\{eos\})", getattr(self, field)) if p]

    def text(self, field: str) -> str:
        """The layout string `field` without its special tokens (e.g. for a tokenizer's training corpus)."""
        return "".join(p for p in self.pieces(field) if p not in ("{bos}", "{eos}"))

    def special_tokens(self) -> list[str]:
        """The token strings the format needs in the vocabulary beyond the tokenizer's own bos / eos."""
        return [t for t in (self.bos, self.eos) if t is not None]


LLAMA2 = ChatFormat(
    name="llama2", about="LLaMA-2 `[INST]` turns, as SEED-X", start="{bos}", user_open="[INST] ",
    user_open_next="\n[INST] ", user_close=" [/INST]\n", round_end="", conversation_end="{eos}", turn_marker=True,
    # text-only turns; a system turn is not part of this layout
    jinja=("{{ bos_token }}{% for message in messages %}"
           "{% if message['role'] == 'user' %}{% if loop.index0 > 0 %}{{ '\\n' }}{% endif %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]\\n' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] }}"
           "{% if loop.last %}{{ eos_token }}{% endif %}"
           "{% else %}{{ raise_exception('only user and assistant turns') }}{% endif %}"
           "{% endfor %}"))

CHATML = ChatFormat(
    name="chatml", about="ChatML `<|im_start|>` turns with SmolLM2's default system turn, as SmolLM2-Instruct",
    bos="<|im_start|>", eos="<|im_end|>", start="{bos}system\n" + SMOLLM2_SYSTEM + "{eos}\n",
    user_open="{bos}user\n", user_open_next="{bos}user\n", user_close="{eos}\n{bos}assistant\n",
    round_end="{eos}\n", conversation_end="", tiny_tokens=("<|im_start|>", "<|im_end|>", "<|im_end|>"),
    # SmolLM2-Instruct's own chat_template, character for character (tests/test_chat_formats.py checks it)
    jinja=("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\n" + SMOLLM2_SYSTEM + "<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"))

FORMATS = {f.name: f for f in (LLAMA2, CHATML)}  # model.mllm.chat_format -> format


def chat_format(name: str) -> ChatFormat:
    """The format called `name` (a key of FORMATS)."""
    if name not in FORMATS:
        raise ValueError(f"unknown chat format {name!r}; one of {sorted(FORMATS)}")
    return FORMATS[name]


__all__ = ["ChatFormat", "CHATML", "FORMATS", "LLAMA2", "SMOLLM2_SYSTEM", "chat_format"]
