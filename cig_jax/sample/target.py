"""What a cache row should hold: the chat template's encoding of a history, put together a round part at a time.

Owns: `HistoryEncoder`, which turns a history (its rounds in the cache) into cache tokens (id, role, image key or
None) equal to `ChatTemplate.encode` without the final `</s>`, from each round's user turn and answer
(`ChatTemplate.user_tokens` / `answer_tokens`). Each part goes through the template once and is kept while the
history uses it, so a round tokenizes only its own text: the history is encoded once, not once per round step.

Does not own: the layout itself (`cig_jax/data/chat_template.py`), image keys (`cache.RowCache.add_image`, through
the session), which rounds are in the cache (`session.py`'s overflow policy), feeding the cache (`cache.py`).
"""
from __future__ import annotations

from typing import Callable

from cig_jax.data.chat_template import IMAGE_QUERY, INPUT_IMAGE, TEXT, ChatTemplate, is_pending


class HistoryEncoder:
    """Cache targets of histories for one template. image_key(image) -> the image's content key, or None for an
    image not drawn yet (its query block is encoded before it exists)."""

    def __init__(self, template: ChatTemplate, image_key: Callable):
        self.template, self.image_key = template, image_key
        self._encoded: dict = {}  # a part's content (`content`) -> the template's TemplateOutput
        self._parts: dict = {}  # (content, image keys) -> the part's cache tokens

    def target(self, rounds: list, *, prompt: bool = False, until_queries: bool = False, where: str = "") -> list:
        """The cache tokens of `rounds` (the history's rounds in the cache): `prompt`: the last round is pending
        (encode up to the generation prompt); `until_queries`: only up to the end of the last round's query
        block. `where` names the conversation in errors."""
        out = [(self.template.bos_id, TEXT, None)]
        for j, rnd in enumerate(rounds):
            last, pending = j == len(rounds) - 1, is_pending(rnd)
            if pending and not (prompt and last):
                if not last:
                    raise ValueError(f"{where}: round {j} has no assistant output but is not the last")
                break
            out += self.part(rnd, user=True, first=j == 0)
            if pending:
                break
            answer = self.part(rnd, user=False)
            if until_queries and last:
                answer = answer[:max(i for i, t in enumerate(answer) if t[1] == IMAGE_QUERY) + 1]
            out += answer
        return out

    def part(self, rnd, *, user: bool, first: bool = False) -> list:
        """A round's user turn (`user`; `first`: the history's first round) or answer as cache tokens."""
        content = self.content(rnd, user=user, first=first)
        images = rnd.user_images if user else [rnd.assistant_image] if rnd.assistant_image is not None else []
        keys = tuple(self.image_key(im) for im in images)
        hit = self._parts.get((content, keys))
        if hit is None:
            enc = self._encoded.get(content)
            if enc is None:
                enc = self._encoded[content] = (self.template.user_tokens(rnd, first=first) if user
                                                else self.template.answer_tokens(rnd))
            hit = self._parts[(content, keys)] = [
                (t, r, keys[k] if r == INPUT_IMAGE else None)
                for t, r, k in zip(enc.input_ids.tolist(), enc.role.tolist(), enc.image_index.tolist())]
        return hit

    @staticmethod
    def content(rnd, *, user: bool, first: bool = False) -> tuple:
        """What a part's tokens depend on (images count by position: their pixels only fill slots)."""
        if user:
            return ("user", first, rnd.user_text, len(rnd.user_images))
        return ("answer", rnd.assistant_text, rnd.assistant_image is not None)

    def keep(self, histories: list) -> None:
        """Forgets the parts that none of `histories` (lists of the rounds in the cache) uses."""
        used = set()
        for rounds in histories:
            for j, rnd in enumerate(rounds):
                used |= {self.content(rnd, user=True, first=j == 0), self.content(rnd, user=False)}
        self._encoded = {c: v for c, v in self._encoded.items() if c in used}
        self._parts = {c: v for c, v in self._parts.items() if c[0] in used and None not in c[1]}


__all__ = ["HistoryEncoder"]
