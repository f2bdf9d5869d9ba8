"""The chat template's tokenization, for the tiny byte-level BPE and a SentencePiece LLaMA-2-style tokenizer:
the ids equal Hugging Face's `apply_chat_template(..., tokenize=True)` with the exported Jinja template (the
tokenizer saved and reloaded, as a user of an export gets it); a round's targets start exactly where the
generation prompt of that round ends (its ids a prefix of the whole); the turn marker the decoder stops on is
how every later round starts; a text holding a layout token's string is refused. (tests/test_export.py checks
the same ids on a real export; tests/test_mllm.py the layout and the loss over it.)"""
import dataclasses

import numpy as np
import pytest
import transformers

from cig_jax.convert.export import CHAT_TEMPLATE
from cig_jax.data.chat_template import ChatTemplate, load_tokenizer
from cig_jax.data.tiny_tokenizer import build_tiny_tokenizer
from cig_jax.data.schema import IMAGE_PLACEHOLDER, Conversation, Round, SchemaError
from cig_jax.data.synthetic import generate
from test_pretrained import sentencepiece_tokenizer


@pytest.fixture(scope="module", params=["tiny", "sentencepiece"])
def tokenizers(request, tmp_path_factory):
    """(the tokenizer training uses, the same tokenizer saved with the Jinja template and reloaded)."""
    root = tmp_path_factory.mktemp(request.param)
    tok = (build_tiny_tokenizer(root / "cache") if request.param == "tiny"
           else load_tokenizer(sentencepiece_tokenizer(root / "spm")))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(root / "export"))
    return tok, transformers.AutoTokenizer.from_pretrained(str(root / "export"))


def _text_only(conv):
    rounds = [Round(user_text=r.user_text.replace(IMAGE_PLACEHOLDER, "").strip() or "Hello.",
                    assistant_text=r.assistant_text) for r in conv.rounds if r.assistant_text]
    return Conversation(id=conv.id, rounds=rounds) if rounds else None


def test_ids_equal_hugging_face_apply_chat_template(tokenizers):
    ours, exported = tokenizers
    template = ChatTemplate(ours, num_image_tokens=4)
    convs = [c for c in map(_text_only, generate(40, seed=5)) if c is not None][:20]
    assert len(convs) == 20
    same = 0
    for conv in convs:
        messages = [m for r in conv.rounds for m in ({"role": "user", "content": r.user_text},
                                                      {"role": "assistant", "content": r.assistant_text})]
        out = exported.apply_chat_template(messages, tokenize=True)
        hf = list(out["input_ids"] if hasattr(out, "keys") else out)
        assert exported.apply_chat_template(messages, tokenize=False) == template.render(conv)
        same += hf == template.encode(conv).input_ids.tolist()
    assert same == 20, f"token ids equal in {same} of 20 conversations"


def round_targets(template, conv):
    """Per round of an answered conversation: (r, the round, the ids of its targets), after checking that the
    encoding of the history up to the round's prompt is a prefix of the whole that holds no target of the round,
    and that the round's first target is the token right after it."""
    enc = template.encode(conv, add_generation_prompt=False)
    for r, rnd in enumerate(conv.rounds):
        prompt = template.encode(dataclasses.replace(conv, rounds=conv.rounds[:r] + [dataclasses.replace(
            rnd, assistant_text=None, assistant_image=None)]))
        n = len(prompt)
        assert enc.input_ids[:n].tolist() == prompt.input_ids.tolist()
        assert not enc.loss_mask[:n][enc.round_index[:n] == r].any()  # the prompt holds no target of round r
        targets = np.flatnonzero((enc.loss_mask == 1) & (enc.round_index == r))
        assert targets[0] == n
        yield r, rnd, enc.input_ids[targets]


def test_targets_start_where_the_generation_prompt_ends(tokenizers):
    """Per answered round: the encoding of the history up to that round's prompt is a prefix of the whole, and
    the round's first target is the token right after it; the round's targets are its reply (+ <img>)."""
    ours, _ = tokenizers
    template = ChatTemplate(ours, num_image_tokens=4)
    byte_level = "Ġ" in ours.get_vocab() or "Ċ" in ours.get_vocab()  # decodes back to exactly its text
    rounds_checked = 0
    for conv in generate(12, seed=3):
        for r, rnd, targets in round_targets(template, conv):
            if byte_level:
                want = (rnd.assistant_text or "") + ("<img>" if rnd.assistant_image is not None else "")
                if r == len(conv.rounds) - 1:
                    want += "</s>"
                assert ours.decode(targets) == want
            rounds_checked += 1
    assert rounds_checked >= 24


def test_every_later_round_opens_with_the_turn_marker(tokenizers):
    ours, _ = tokenizers
    template = ChatTemplate(ours, num_image_tokens=4)
    m = template.turn_marker
    assert m and ours.decode(m).strip() == "[INST]"
    opened = 0
    for conv in generate(8, seed=1):  # after a drawn image's write-back block and, text only, after a reply
        for c in (conv, _text_only(conv)):
            enc = template.encode(c, add_generation_prompt=False)
            for r in range(1, len(c.rounds)):
                start = int(np.flatnonzero(enc.round_index == r)[0])
                assert enc.input_ids[start:start + len(m)].tolist() == m
                opened += 1
    assert opened > 0


def test_a_text_holding_a_layout_token_string_is_refused(tokenizers):
    ours, _ = tokenizers
    template = ChatTemplate(ours, num_image_tokens=4)
    conv = Conversation(id="bad", rounds=[Round(user_text="Look: <img_00001> here.", assistant_text="Sure.")])
    with pytest.raises(SchemaError, match="<img_00001>"):
        template.encode(conv)


def test_remembered_segments_give_the_same_ids_from_many_threads_and_after_pickling(tokenizers, monkeypatch):
    """The template remembers tokenized segments; grain's map threads share one template and its worker
    processes get a pickled copy: with a memo small enough to evict all the time, 8 threads encoding at once
    and a pickled copy give the ids of a template that never remembers."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from cig_jax.data import chat_template

    ours, _ = tokenizers
    convs = list(generate(24, seed=9))
    monkeypatch.setattr(chat_template, "MEMO_SIZE", 0)
    truth = [ChatTemplate(ours, num_image_tokens=4).encode(c, add_generation_prompt=False).input_ids.tolist()
             for c in convs]
    monkeypatch.setattr(chat_template, "MEMO_SIZE", 5)
    shared = ChatTemplate(ours, num_image_tokens=4)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda c: shared.encode(c, add_generation_prompt=False).input_ids.tolist(), convs * 4))
    assert got == truth * 4
    copy = pickle.loads(pickle.dumps(shared))
    assert [copy.encode(c, add_generation_prompt=False).input_ids.tolist() for c in convs] == truth
