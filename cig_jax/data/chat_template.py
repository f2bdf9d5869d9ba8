"""How a conversation becomes tokens: the chat layout, image slots, image-query tokens, loss masks.

Owns: the special tokens (`add_mllm_tokens`, added to any Hugging Face tokenizer loaded from a local path),
`ChatTemplate.encode` (conversation -> `TemplateOutput` arrays; `render`
gives the one string it tokenizes), and `pad_to` for batching.

Does not own: the tiny offline tokenizer of the tests and the tiny demo (`tiny_tokenizer.py`), the chat formats' strings and tokens (`chat_formats.py`: 'llama2', the default, below, and
'chatml', SmolLM2-Instruct's; `model.mllm.chat_format` picks one), the conversation dataclasses (`schema.py`),
image pixels / preprocessing and batching across examples (`pipeline.py`), what the model does with the slots
(`models/mllm.py`).

Layout ('llama2': LLaMA-2 chat as SEED-X writes it; every round after the first starts with "\\n[INST] "):

    <s>[INST] {user images}{user text} [/INST]\\n{assistant text}{assistant image}\\n[INST] ... [/INST]\\n...</s>

An image block is `<img>` + num_image_tokens slot tokens `<img_00000>`..`<img_00063>` + `</img>`.
  * a user image is an *input block*: the MLLM overwrites the slot embeddings with the input resampler's
    tokens of that image (role INPUT_IMAGE);
  * an assistant image is a *query block* (role IMAGE_QUERY: the slots keep their token embeddings, which are
    the learnable image queries; the final hidden states there go to the output resampler and regress the
    image's ViT features) immediately followed by an *input block* of the same image, so later rounds see a
    generated image exactly as they see a user image. Sampling does the same: generate the query block, make
    the image, write it back as an input block.

With person slots (`person_slots=True`, `persons.py`): after an image block, " Name<person>" for each named,
boxed person of the image (role PERSON_SLOT, image_index: the person's crop, appended to `images`); a query
block opens with " Name<person>" for each person it draws (role PERSON_QUERY, image_index: that person's crop in
the answer's image, -1 while sampling), then its queries.

Loss mask (marks *targets*: position t is 1 when token t must be predicted from position t-1): 1 on assistant
text, on the `<img>` that opens a query block, and on the final `</s>`; 0 on user turns, on every image slot,
on `</img>`, and on the write-back input block. A round that is not the last ends without `</s>` (as in
SEED-X): at sampling time a round ends when the model predicts `</s>`, which is not fed back, so the cache holds
exactly the training layout. ('chatml' ends every answered round with `<|im_end|>` (a target) and "\\n", and the
next round reads them: the sampling cache holds them too. `encode(..., end=...)` gives each of these cuts.)

Tokenization: the whole conversation is rendered as one string (special tokens written as their strings) and
tokenized in one call, exactly as Hugging Face's `tokenizer.apply_chat_template(..., tokenize=True)` tokenizes
the exported Jinja template's rendering (`cig_jax/convert/export.py`), so a text-only conversation gets the same
ids here and for a user of the exported folder. (Tokenizing piece by piece would not: SentencePiece prepends a
word-start piece to every separately tokenized piece, and byte-level BPE joins a marker's trailing space to the
next word.) Special tokens always split the text, so every image slot, `<img>`, `</img>`, `<s>` and `</s>`
sits at a known position (a format's own bos / eos too). Inside a run of text, a boundary between parts (user
turn | assistant text | next turn) is placed where the tokenization of the text up to the boundary stops
agreeing with the tokenization of the whole (`ChatTemplate._tokenize`): a token that straddles a boundary belongs to the part after it. So the
targets are exactly the tokens the text before the reply does not already determine, as at sampling time,
where the prompt ends after " [/INST]\\n" and the cache keeps the common prefix when the history is re-encoded.
Special tokens split the string before the tokenizer reads it, so the string is tokenized segment by segment (a
special part and the text up to the next one), and the template remembers each segment's ids: a history encoded
again every round reads only its new segments (from the last image block on).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from pathlib import Path

import numpy as np

from cig_jax.data import chat_formats, schema
from cig_jax.data.persons import PERSON, person_crop, slotted_people
from cig_jax.data.schema import user_segments

BOI, EOI = "<img>", "</img>"
BOP, EOP = "<patch>", "</patch>"  # any-resolution sub-image blocks (SEED-X); reserved, not produced here
IMG = "<img_{:05d}>"
LOC = "<loc-{}>"
MEMO_SIZE = 4096  # tokenized segments a template remembers (a long chat session holds a few hundred)
NUM_IMG_TOKENS = 100  # slot tokens in the vocabulary (<img_00000>..<img_00099>); a block uses num_image_tokens
NUM_LOC_TOKENS = 224  # grounding coordinates <loc-0>..<loc-223>
# With <box_start>/<box_end> these are the 330 tokens that take LLaMA-2's 32000 to SEED-X's 32330.
BOX_START, BOX_END = "<box_start>", "<box_end>"

ENDS = ("conversation", "round", "answer")  # where `encode` ends a conversation whose last round is answered

# role values (the MLLM's `role` input: cig_jax.models.mllm reads them from here). With person slots
# (`persons.py`): PERSON_SLOT, a history image's person, filled with the summary of that person's crop
# (image_index: the crop); PERSON_QUERY, a person of the image being drawn (image_index: the crop of the
# target image's person where the record has it, for the identity head's loss; -1 when sampling).
TEXT, INPUT_IMAGE, IMAGE_QUERY, PERSON_SLOT, PERSON_QUERY = 0, 1, 2, 3, 4


def mllm_special_tokens() -> list[str]:
    """The tokens the MLLM needs, in the order they are added."""
    return ([BOI, EOI] + [IMG.format(i) for i in range(NUM_IMG_TOKENS)] + [LOC.format(i) for i in range(NUM_LOC_TOKENS)]
            + [BOP, EOP, BOX_START, BOX_END])


def add_mllm_tokens(tokenizer) -> int:
    """Adds the MLLM's special tokens to a Hugging Face tokenizer (no-op for those it already has, e.g. the
    SEED-X tokenizer). Returns how many were added. Give the LLM `len(tokenizer)` rows of embeddings."""
    have = set(tokenizer.get_vocab())
    missing = [t for t in mllm_special_tokens() if t not in have]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return len(missing)


def load_tokenizer(path: str | Path):
    """A tokenizer from a local directory (e.g. the SEED-X or LLaMA-2 tokenizer), with the MLLM tokens added."""
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory not found: {path}. Download a LLaMA-2 or SEED-X tokenizer (tokenizer.json or "
            "tokenizer.model + tokenizer_config.json) into it, or use tiny_tokenizer.build_tiny_tokenizer() for tests.")
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_mllm_tokens(tok)
    return tok


# ----------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TemplateOutput:
    """One conversation as token-aligned arrays, all [T]. `images` lists the conversation's images in
    `image_index` order (per round: user images, then the assistant image)."""

    input_ids: np.ndarray  # int32
    role: np.ndarray  # int32: 0 text, 1 input-image slot, 2 image-query slot
    image_index: np.ndarray  # int32: image that fills (role 1) or is the target of (role 2) this slot; -1 else
    loss_mask: np.ndarray  # int32: 1 where this token is a next-token target
    round_index: np.ndarray  # int32: round of this token (0 for <s>)
    images: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclasses.dataclass
class _Part:
    """A piece of the layout: text (tokenized with its neighbours) or special-token ids (one token each)."""

    text: str = ""
    ids: tuple = ()  # special-token ids; empty for text
    role: int | tuple = TEXT  # role, image, loss: one value for all the part's tokens, or one per id
    image: int | tuple = -1
    loss: int | tuple = 0
    rnd: int = 0


class ChatTemplate:
    """Turns conversations into token arrays, for one tokenizer.

    tokenizer: a Hugging Face tokenizer (its MLLM tokens are added if missing; the chat format's own tokens must be
    in it: a ValueError says so otherwise).
    num_image_tokens: slots per image block (config `model.mllm.num_image_tokens`, 64 for SEED-X).
    chat_format: a name in `chat_formats.FORMATS` (config `model.mllm.chat_format`).
    person_slots: a named person's slot after each image and before each drawn image's queries (`persons.py`;
    config `model.mllm.person_slots`); adds the `<person>` token to the tokenizer.
    """

    def __init__(self, tokenizer, num_image_tokens: int = 64, chat_format: str = "llama2", person_slots: bool = False):
        if not 0 < num_image_tokens <= NUM_IMG_TOKENS:
            raise ValueError(f"num_image_tokens must be in 1..{NUM_IMG_TOKENS}, got {num_image_tokens}")
        self.format = fmt = chat_formats.chat_format(chat_format)
        add_mllm_tokens(tokenizer)
        if person_slots and PERSON not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [PERSON]}, replace_extra_special_tokens=False)
        self.tokenizer, self.num_image_tokens, self.person_slots = tokenizer, num_image_tokens, person_slots
        self._memo: collections.OrderedDict = collections.OrderedDict()  # segment text -> ids (`_ids`)
        self._lock = threading.Lock()
        tid = tokenizer.convert_tokens_to_ids
        self.boi_id, self.eoi_id = tid(BOI), tid(EOI)
        self.slot_ids = np.asarray([tid(IMG.format(i)) for i in range(num_image_tokens)], np.int32)
        missing = [t for t in fmt.special_tokens() if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"chat format {fmt.name!r} needs the tokens {missing}, which the tokenizer lacks: use "
                             f"a tokenizer that has them (SmolLM2's for 'chatml', or tiny_tokenizer.build_tiny_tokenizer(..., "
                             f"chat_format={fmt.name!r})) or another model.mllm.chat_format")
        if fmt.bos is None:  # the tokenizer's own
            self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        else:
            self.bos_id, self.eos_id = tid(fmt.bos), tid(fmt.eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("the tokenizer needs bos and eos tokens (<s>, </s>)")
        self.person_id = tid(PERSON) if person_slots else None
        layout = {self.bos_id, self.eos_id, self.boi_id, self.eoi_id, *self.slot_ids.tolist()}
        if person_slots:
            layout.add(self.person_id)
        self._strings = {i: tokenizer.convert_ids_to_tokens(i) for i in layout}  # layout token id -> its string
        self._layout = {k: [_Part(ids=(self.bos_id,)) if p == "{bos}" else
                            _Part(ids=(self.eos_id,), loss=int(k in fmt.TARGETS)) if p == "{eos}" else _Part(p)
                            for p in fmt.pieces(k)] for k in fmt.LAYOUT}  # a layout string's parts
        self.turn_marker: list = []  # a format whose rounds end only at eos has none
        if fmt.turn_marker:
            # The ids that open a new user turn after an answer ("\n[INST]"), as they sit in an encoded history
            # (the trailing space may merge with the next word): decoding stops when the model writes them.
            probe = [*self._at("start", 0), _Part(fmt.user_open + "Hi." + fmt.user_close + "Sure."),
                     _Part(fmt.user_open_next.rstrip(), rnd=1), _Part(" Hi.", rnd=2)]
            enc = self._tokenize(probe, "the turn-marker probe")
            self.turn_marker = enc.input_ids[enc.round_index == 1].tolist()

    def _at(self, name: str, rnd: int) -> list:
        """The format's layout string `name` as parts of round `rnd`."""
        return [dataclasses.replace(p, rnd=rnd) for p in self._layout[name]]

    @property
    def query_ids(self) -> np.ndarray:
        """The image-query token ids [num_image_tokens] (what `MLLM.generate_image` appends)."""
        return self.slot_ids

    def image_block(self) -> list[int]:
        """`<img>` + slots + `</img>` ids."""
        return [self.boi_id, *self.slot_ids.tolist(), self.eoi_id]

    def _input_block(self, image: int, rnd: int) -> _Part:
        n = self.num_image_tokens
        return _Part(ids=tuple(self.image_block()), role=(TEXT,) + (INPUT_IMAGE,) * n + (TEXT,),
                     image=(-1,) + (image,) * n + (-1,), rnd=rnd)

    def _query_block(self, image: int, rnd: int, people: tuple = ()) -> list:
        """`<img>` (a target: it draws), with person slots each drawn person's name + `<person>` (people:
        (name, index of the person's crop or -1)), then the queries and `</img>`."""
        n = self.num_image_tokens
        if not people:
            return [_Part(ids=tuple(self.image_block()), role=(TEXT,) + (IMAGE_QUERY,) * n + (TEXT,),
                          image=(-1,) + (image,) * n + (-1,), loss=(1,) + (0,) * (n + 1), rnd=rnd)]
        parts = [_Part(ids=(self.boi_id,), loss=1, rnd=rnd)]
        for name, crop in people:
            parts += [_Part(" " + name, rnd=rnd), _Part(ids=(self.person_id,), role=PERSON_QUERY, image=crop, rnd=rnd)]
        return parts + [_Part(ids=(*self.slot_ids.tolist(), self.eoi_id), role=(IMAGE_QUERY,) * n + (TEXT,),
                              image=(image,) * n + (-1,), rnd=rnd)]

    def _person_crops(self, image, images: list) -> list:
        """(name, index of its crop in `images` or -1) for each slotted person of `image`, appending the crops
        (an image without pixels gets no crops: its slots keep the `<person>` embedding)."""
        if not self.person_slots:
            return []
        out = []
        for p in slotted_people(image):
            k = -1
            if image.pixels is not None:
                k = len(images)
                images.append(person_crop(image, p))
            out.append((p.name, k))
        return out

    def _person_slots(self, people: list, rnd: int) -> list:
        """A history image's person slots: name + `<person>` filled with the crop's summary."""
        return [q for name, crop in people for q in
                (_Part(" " + name, rnd=rnd), _Part(ids=(self.person_id,), role=PERSON_SLOT, image=crop, rnd=rnd))]

    def render(self, conv, *, add_generation_prompt: bool = True, end: str = "conversation") -> str:
        """The conversation as the one string that `encode` tokenizes (image blocks as token strings); for a
        text-only conversation, what the exported Jinja chat template renders."""
        return "".join(self._render(p) for p in self._parts(conv, add_generation_prompt, end)[0])

    def _render(self, p: _Part) -> str:
        return "".join(self._strings[i] for i in p.ids) if p.ids else p.text

    def _parts(self, conv, add_generation_prompt: bool, end: str) -> tuple[list, list]:
        if end not in ENDS:
            raise ValueError(f"end must be one of {ENDS}, got {end!r}")
        parts, images = self._at("start", 0), []
        rounds = list(conv.rounds)
        last_answered, closing = False, []  # closing: the last answered round's end, once a round follows it
        for r, rnd in enumerate(rounds):
            pending = rnd.assistant_text is None and rnd.assistant_image is None
            if pending and not (add_generation_prompt and r == len(rounds) - 1):
                if r != len(rounds) - 1:
                    raise ValueError(f"round {r} has no assistant output but is not the last round")
                break
            parts += closing
            parts += self._at("user_open" if r == 0 else "user_open_next", r)
            for seg in user_segments(rnd):
                if isinstance(seg, str):
                    parts.append(_Part(seg, rnd=r))
                else:
                    parts.append(self._input_block(len(images), r))
                    images.append(seg)
                    parts += self._person_slots(self._person_crops(seg, images), r)
            parts += self._at("user_close", r)
            last_answered = not pending
            if pending:
                break
            if rnd.assistant_text:
                parts.append(_Part(rnd.assistant_text, loss=1, rnd=r))
            if rnd.assistant_image is not None:
                k = len(images)
                images.append(rnd.assistant_image)
                people = self._person_crops(rnd.assistant_image, images)
                drawn = people or ([(p.name, -1) for p in rnd.assistant_image.people if p.name]
                                   if self.person_slots else [])  # a drawing being sampled: names, no crops yet
                parts += self._query_block(k, r, tuple(drawn))
                parts.append(self._input_block(k, r))  # the drawn image, written back for later rounds
                parts += self._person_slots(people, r)
            closing = self._at("round_end", r)
        if last_answered and end != "answer":
            parts += closing
            if end == "conversation":
                parts += self._at("conversation_end", len(rounds) - 1)
        return parts, images

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, remembered (`_memo`, the last MEMO_SIZE texts): the texts are segments that
        start with a layout token's string, and a history encoded again round after round tokenizes only the
        segments it has not seen (the new round's). Safe from several threads (grain's map threads share a
        template)."""
        with self._lock:
            known = {t: self._memo.get(t) for t in texts}
        missing = [t for t, ids in known.items() if ids is None]
        if missing:
            known.update(zip(missing, map(list, self.tokenizer(missing, add_special_tokens=False)["input_ids"])))
        with self._lock:
            for t, ids in known.items():
                self._memo[t] = ids
                self._memo.move_to_end(t)
            while len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
        return [known[t] for t in texts]

    def __getstate__(self):  # to worker processes: without the lock and the memo
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_memo")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock, self._memo = threading.Lock(), collections.OrderedDict()

    def _tokenize(self, parts: list, where: str) -> TemplateOutput:
        """Tokenizes the rendered parts in one call; every token gets its part's role, image, loss and round.
        The first part is always a special one (`<s>`)."""
        merged: list = []  # neighbouring text parts that label their tokens alike, joined: fewer boundaries
        for p in parts:
            if not (p.ids or p.text):
                continue
            q = merged[-1] if merged else None
            if q is not None and not (p.ids or q.ids) and (q.loss, q.rnd) == (p.loss, p.rnd):
                merged[-1] = dataclasses.replace(q, text=q.text + p.text)
            else:
                merged.append(p)
        rendered = [self._render(p) for p in merged]
        char = np.cumsum([0] + [len(x) for x in rendered])
        string = "".join(rendered)
        # Special tokens split the string before anything else reads it, so the string's ids are those of its
        # segments (a special part and the text after it, up to the next special part) tokenized one by one.
        heads = [j for j, p in enumerate(merged) if p.ids] + [len(merged)]
        ids = [i for seg in self._ids([string[char[a]:char[b]] for a, b in zip(heads, heads[1:])]) for i in seg]
        n = len(ids)
        # every layout token comes out of the string whole and in order, and no text adds one
        at = [t for t, i in enumerate(ids) if i in self._strings]
        if [ids[t] for t in at] != [i for p in merged for i in p.ids]:
            culprits = sorted({x for p in merged if not p.ids for x in self._strings.values() if x in p.text})
            raise schema.SchemaError(
                f"{where}: a text holds the chat layout's token string(s) {culprits}; remove them" if culprits else
                f"{where}: the tokenizer splits the chat layout's tokens ({BOI}, {IMG.format(0)}, ...); add them "
                "as special tokens (add_mllm_tokens)")
        # token ranges: a special part where its ids are; the first text part of a run right after the special
        # part before it; a later one where tokenizing the text up to it stops agreeing with the whole (`ids`)
        starts, anchor, k = [0] * (len(merged) + 1), 0, 0
        starts[-1] = n
        inner = []  # (part, the special part before it)
        for j, p in enumerate(merged):
            if p.ids:
                starts[j], anchor = at[k], j
                k += len(p.ids)
            elif merged[j - 1].ids:
                starts[j] = starts[j - 1] + len(merged[j - 1].ids)
            else:
                inner.append((j, anchor))
        run_end = n
        ends = [n] * len(merged)  # where the run of text holding part j ends (the next special part)
        for j in range(len(merged) - 1, -1, -1):
            ends[j] = run_end
            if merged[j].ids:
                run_end = starts[j]
        cuts = self._ids([string[char[a]:char[j]] for j, a in inner]) if inner else []
        for (j, a), cut in zip(inner, cuts):
            b = starts[a] + _common_prefix(cut, ids[starts[a]:])
            starts[j] = min(max(b, starts[j - 1]), ends[j])
        role, loss, rnd = (np.zeros(n, np.int32) for _ in range(3))
        image = np.full(n, -1, np.int32)
        for j, p in enumerate(merged):
            sl = slice(starts[j], starts[j + 1])
            role[sl], image[sl], loss[sl], rnd[sl] = p.role, p.image, p.loss, p.rnd
        return TemplateOutput(np.asarray(ids, np.int32), role, image, loss, rnd)

    def encode(self, conv, *, add_generation_prompt: bool = True, end: str = "conversation") -> TemplateOutput:
        """Conversation (`schema.Conversation` or any object with `.rounds` of objects with user_text,
        user_images, assistant_text, assistant_image) -> TemplateOutput.

        A last round without assistant output ends after " [/INST]\\n" (the prompt the model continues) when
        `add_generation_prompt`; otherwise it is dropped. A conversation whose last round is answered ends as
        `end` says: 'conversation' (training): with the round's end and the conversation's (llama2 `</s>`;
        chatml `<|im_end|>\\n`); 'round' (what a sampling cache holds after the round): without the
        conversation's end, which is predicted and never fed back (llama2: no `</s>`; chatml: the same as
        'conversation'); 'answer': after the last answer (its image blocks included), before any end. Raises
        schema.SchemaError when a text holds one of the layout's token strings."""
        parts, images = self._parts(conv, add_generation_prompt, end)
        out = self._tokenize(parts, schema.conversation_label(conv) if isinstance(conv, schema.Conversation) else "conversation")
        out.images = images
        return out


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pad_to(out: TemplateOutput, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """TemplateOutput -> dict of [length] arrays (right padding) plus `attention_mask`. Raises if too long."""
    t = len(out)
    if t > length:
        raise ValueError(f"sequence of {t} tokens does not fit {length}; drop rounds or raise data.seq_len")
    pad = length - t

    def p(x, v):
        return np.concatenate([x, np.full((pad,), v, np.int32)])

    return dict(input_ids=p(out.input_ids, pad_id), role=p(out.role, TEXT), image_index=p(out.image_index, -1),
                loss_mask=p(out.loss_mask, 0), round_index=p(out.round_index, -1),
                attention_mask=p(np.ones((t,), np.int32), 0))


__all__ = ["BOI", "EOI", "BOP", "EOP", "IMG", "LOC", "TEXT", "INPUT_IMAGE", "IMAGE_QUERY", "ChatTemplate",
           "TemplateOutput", "add_mllm_tokens", "load_tokenizer", "mllm_special_tokens", "pad_to"]
