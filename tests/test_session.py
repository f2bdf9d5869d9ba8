"""Sampling over a chat history: a cached round equals recomputing the whole history, drawn images feed later
rounds, batches and the mesh change nothing, the overflow policy is explicit, and sample.py refuses bad input
with one line, exit status 2 and nothing written."""
import copy
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image as PILImage

from cig_jax.data import schema
from cig_jax.data import schema_io
from cig_jax.data.chat_template import BOI, IMAGE_QUERY, mllm_special_tokens
from cig_jax.data.pipeline import preprocess_image
from cig_jax.sample.session import ChatSession, ContextOverflowError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "two_friends.json"


def _sample_main():
    from cig_jax.sample.cli import main  # what `python sample.py` runs

    return main


@pytest.fixture(scope="module")
def ckpt(tiny_run):  # conftest.py: a tiny run with random weights
    return tiny_run


@pytest.fixture(scope="module")
def session(ckpt):
    return ChatSession.from_checkpoint(ckpt, identity_embedder=False)  # max_len 2048, as sample.py: shared compiles


def _picture(seed, size=40):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------
# The reference: every token recomputed from the whole history, no cache
# ----------------------------------------------------------------------------------------------------------
class Recompute:
    """Greedy decoding of a round by running the whole history through the model without a KV cache, once per
    new token (the chat template encodes it; padded to a fixed length so it compiles once)."""

    LENGTH, IMAGES, BLOCKS = 256, 4, 4

    def __init__(self, session):
        self.t = session.template
        self.size = session.image_size
        graphdef, state = nnx.split(nnx.merge(session.graph, session.state).mllm)
        tok = self.t.tokenizer
        vocab = session.cfg.model.llm.vocab_size
        self.banned = np.zeros((vocab,), bool)  # assistant text never holds image / chat markup
        for name in [t for t in mllm_special_tokens() if t != BOI] + [tok.bos_token, tok.pad_token, tok.unk_token]:
            self.banned[tok.convert_tokens_to_ids(name)] = True
        self.banned[len(tok):] = True

        @jax.jit
        def forward(state, ids, role, index, mask, images):
            out = nnx.merge(graphdef, state)(ids, role, index, images=images, attention_mask=mask,
                                              num_query_blocks=self.BLOCKS)
            return out.logits[0], out.visual_embeddings[0]

        self.forward = lambda *a: forward(state, *a)

    def run(self, ids, role, index, images):
        n = len(ids)
        pad = lambda x, v: jnp.asarray([list(x) + [v] * (self.LENGTH - n)])  # noqa: E731
        pixels = np.zeros((1, self.IMAGES, self.size, self.size, 3), np.float32)
        for k, im in enumerate(images):
            pixels[0, k] = preprocess_image(im.pixels, self.size)
        return self.forward(pad(ids, self.t.pad_id), pad(role, 0), pad(index, -1), pad([1] * n, 0), jnp.asarray(pixels))

    def round(self, history: schema.Conversation, rnd: schema.Round, max_new: int, force_image: bool):
        conv = dataclasses.replace(history, rounds=history.rounds + [rnd])
        enc = self.t.encode(conv)
        ids, role, index = enc.input_ids.tolist(), enc.role.tolist(), enc.image_index.tolist()
        marker = list(self.t.turn_marker)
        tokens, stop = [], "max_new_tokens"
        while len(tokens) < max_new:
            logits, _ = self.run(ids, role, index, enc.images)
            t = int(np.argmax(np.where(self.banned, -np.inf, np.asarray(logits[len(ids) - 1]))))
            if t in (self.t.eos_id, self.t.boi_id):
                stop = "eos" if t == self.t.eos_id else "image"
                break
            tokens.append(t)
            ids, role, index = ids + [t], role + [0], index + [-1]
            if tokens[-len(marker):] == marker:
                del tokens[-len(marker):]
                stop = "turn_marker"
                break
        if not (force_image or stop == "image"):
            return tokens, stop, None
        drawn = dataclasses.replace(rnd, assistant_text=self.t.tokenizer.decode(tokens),
                                    assistant_image=schema.Image(pixels=np.zeros((8, 8, 3), np.uint8)))
        enc = self.t.encode(dataclasses.replace(history, rounds=history.rounds + [drawn]), add_generation_prompt=False)
        n = int(np.flatnonzero(enc.role == IMAGE_QUERY)[-1]) + 1  # up to the end of this round's query block
        _, vis = self.run(enc.input_ids[:n].tolist(), enc.role[:n].tolist(), enc.image_index[:n].tolist(), enc.images)
        block = int(np.sum(enc.role[:n] == IMAGE_QUERY)) // self.t.num_image_tokens - 1
        return tokens, stop, np.asarray(vis[block])

    def check(self, res, history: schema.Conversation, text: str, images: list, max_new: int, force: bool,
              where: str):
        """Asserts that a session's round (`res`, run over `history`) chose the tokens, the stop and the visual
        embeddings of recomputing it; returns those embeddings (None when it did not draw)."""
        rnd = schema.Round(user_text=text, user_images=[schema.Image(pixels=p) for p in images])
        tokens, stop, vis = self.round(history, rnd, max_new, force)
        assert (res.tokens, res.stop) == (tokens, stop), where
        assert (res.image is None) == (vis is None), where
        if vis is not None:
            np.testing.assert_allclose(res.visual_embeddings, vis, atol=1e-5, err_msg=where)
        return vis


def _cache_ids(session, row=0):
    return [t[0] for t in session.cache.tokens[row]]


# ----------------------------------------------------------------------------------------------------------
def test_cached_round_equals_full_recompute(session):
    """Four rounds (a user photo, two drawings, a text-only answer): every round's text tokens and visual
    embeddings equal those of recomputing the whole history from scratch, and the cache then holds exactly the
    chat template's encoding of the history."""
    ref = Recompute(session)
    session.reset()
    spec = [("Julian has red hair.", [_picture(0)], True), ("Draw Julian and Maya in the park.", [], True),
            ("Who wears a hat?", [], False), ("Show Julian again in the snow.", [], True)]
    drawn = 0
    for r, (text, images, force) in enumerate(spec):
        before = session.history
        res = session.round(text, images, seed=r, options=session.options(force_image=force, max_new_tokens=5))
        if ref.check(res, before, text, images, 5, force, f"round {r}") is not None:
            assert res.image.dtype == np.uint8 and res.image.shape == (32, 32, 3)
            drawn += 1
    assert drawn == 3 and any(len(r.assistant_text or "") for r in session.history.rounds)
    session.flush()  # the last drawing's write-back block, which otherwise goes in with the next user turn
    enc = session.template.encode(session.history, add_generation_prompt=False)
    assert _cache_ids(session) == enc.input_ids[:-1].tolist()  # everything but the final </s>


def test_a_round_encodes_only_its_new_tokens(session, monkeypatch):
    """The history is encoded once: in each round the tokenizer reads only that round's own text (never an
    earlier round's: the template remembers the segments it has tokenized), the model is fed only the tokens the round adds to the cache (nothing of the history retracted or
    fed again; of the round's own decoded text, only the tokens that re-tokenize differently are fed again, as
    the cache mirrors the template's encoding), and only the round's new images go through the ViT (its user
    photos, the previous round's drawing written back with this user turn)."""
    import cig_jax.sample.cache as cache_mod
    from cig_jax.sample.cache import common_prefix

    session.reset()
    session.template._memo.clear()  # from a cold start: earlier tests told the template these texts
    tok = session.template.tokenizer
    seen = {"text": [], "fed": 0, "vit": 0, "decoded": []}
    encode, append, preprocess = tok.encode, cache_mod._append, cache_mod.preprocess_image

    class CountingTokenizer:  # what the template hands the tokenizer to read
        def __call__(self, texts, *a, **kw):
            seen["text"] += list(texts)
            return tok(texts, *a, **kw)

        def __len__(self):
            return len(tok)

        def __getattr__(self, name):
            return getattr(tok, name)

    def counting_append(graph, state, ids, role, image_index, valid, *rest):
        seen["fed"] += int(np.asarray(valid).sum())
        return append(graph, state, ids, role, image_index, valid, *rest)

    def counting_preprocess(*a, **kw):
        seen["vit"] += 1
        return preprocess(*a, **kw)

    record_fed = session.cache.record_fed
    monkeypatch.setattr(session.template, "tokenizer", CountingTokenizer())
    monkeypatch.setattr(cache_mod, "_append", counting_append)
    monkeypatch.setattr(cache_mod, "preprocess_image", counting_preprocess)
    monkeypatch.setattr(session.cache, "record_fed", lambda fed: (
        seen.update(fed=seen["fed"] + len(fed[0]), decoded=list(fed[0])), record_fed(fed))[1])
    spec = [("Julian has red hair.", [_picture(0)], True, 5),
            ("Draw Julian and Maya in the park.", [_picture(1)], True, 0), ("Who wears a hat?", [], False, 5), ("Show Julian again in the snow.", [], True, 5),
            ("And Maya at the beach?", [_picture(2)], True, 5)]
    drew, ref = False, Recompute(session)
    for r, (text, images, force, max_new) in enumerate(spec):
        before, history = list(session.cache.tokens[0]), session.history
        seen.update(text=[], fed=0, vit=0, decoded=[])
        res = session.round(text, images, seed=r, options=session.options(force_image=force, max_new_tokens=max_new))
        after = session.cache.tokens[0]
        # the rounds up to the last one answered with an image (its image block is special tokens, which split
        # the text: later text is tokenized on its own); a text-only answer's end may still merge with the next
        # turn's opening, so the text since then is read again
        k = max([q for q, rnd in enumerate(history.rounds) if rnd.assistant_image is not None], default=-1)
        earlier = [t for t, *_ in spec[:k + 1]] + [rnd.assistant_text for rnd in history.rounds[:k + 1]
                                                   if len((rnd.assistant_text or "").strip()) >= 8]  # telling
        assert any(text in t for t in seen["text"]), f"round {r}: its text was never tokenized"
        assert not [t for t in seen["text"] if any(e in t for e in earlier)], f"round {r}: an earlier round re-read"
        assert after[:len(before)] == before, f"round {r}: the history was retracted"
        retokenized = encode(res.text, add_special_tokens=False) if res.text else []
        refed = len(seen["decoded"]) - common_prefix(seen["decoded"], retokenized)
        assert seen["fed"] == len(after) - len(before) + refed, f"round {r}"
        assert seen["vit"] == len(images) + drew, f"round {r}"
        if max_new == 0:  # no text: the prompt and the query block go in together, and compute the same
            rnd = schema.Round(user_text=text, user_images=[schema.Image(pixels=p) for p in images])
            np.testing.assert_allclose(res.visual_embeddings, ref.round(history, rnd, 0, True)[2], atol=1e-5)
        drew = res.image is not None
    assert drew
    session.flush()
    enc = session.template.encode(session.history, add_generation_prompt=False)
    assert _cache_ids(session) == enc.input_ids[:-1].tolist()


def test_drawn_image_is_seen_by_later_rounds(session):
    """Round 1's drawing goes back into the cache: replaying the same history gives the same round 3, and
    changing only round 1's image changes round 3, which names the person drawn there."""
    session.reset()
    session.round("Draw Julian in the park.", seed=1, options=session.options(force_image=True))
    session.round("Who wears a hat?", seed=2)
    third = session.round("Now show Julian from the first picture at the beach.", seed=3, options=session.options(force_image=True))
    history = session.history

    other = session.with_batch_size(1)
    other.replay(dataclasses.replace(history, rounds=history.rounds[:2]))
    again = other.round("Now show Julian from the first picture at the beach.", seed=3, options=other.options(force_image=True))
    np.testing.assert_allclose(again.visual_embeddings, third.visual_embeddings, atol=1e-5)
    assert again.tokens == third.tokens

    changed = copy.deepcopy(history)
    changed.rounds[0].assistant_image = schema.Image(pixels=255 - history.rounds[0].assistant_image.pixels)
    other.replay(dataclasses.replace(changed, rounds=changed.rounds[:2]))
    moved = other.round("Now show Julian from the first picture at the beach.", seed=3, options=other.options(force_image=True))
    assert np.abs(moved.visual_embeddings - third.visual_embeddings).max() > 1e-3
    other.flush()
    enc = other.template.encode(other.history, add_generation_prompt=False)
    assert _cache_ids(other) == enc.input_ids[:-1].tolist()


def _sibling(session, **kw):
    """Another session over the same weights (same max_len: the compiled code is shared)."""
    return ChatSession(nnx.merge(session.graph, session.state), session.template, session.cfg,
                       identity_embedder=False, **kw)


def test_overflow_is_an_error_or_drops_oldest_text_rounds_explicitly(session, caplog):
    """A history that fits the 2048-slot cache, and a next round that does not: 'error' raises and leaves the
    history as it was; 'drop_oldest' leaves the oldest text-only round out, says so, and the cache then holds
    the encoding of the rounds kept."""
    t, max_new = session.template, 2
    reserve = max_new + 2 * t.num_image_tokens + 4  # text, <img> + queries + </img>, the write-back block
    prompt = schema.Round(user_text="Show Julian at the beach.")
    tail = [schema.Round("Draw Julian.", [], "Here is Julian.", schema.Image(pixels=_picture(5, 32))),
            schema.Round("Who wears a hat?", [], "Maya wears a hat.")]
    for k in range(1, 1000):  # a first round just long enough that the history fits but the next round does not
        history = schema.Conversation(id="long", rounds=[schema.Round("Julian has red hair. " * k, [], "Sure.")] + tail)
        n_history = len(t.encode(history, add_generation_prompt=False)) - 1
        n_prompt = len(t.encode(dataclasses.replace(history, rounds=history.rounds + [prompt]))) - n_history
        if n_history + n_prompt + reserve > session.max_len:
            break
    assert n_history <= session.max_len

    strict = _sibling(session)
    strict.replay(history)
    with pytest.raises(ContextOverflowError, match=r"long.*rounds\[3\].*KV-cache slots.*drop_oldest"):
        strict.round(prompt.user_text, seed=3, options=strict.options(max_new_tokens=max_new))
    assert len(strict.history.rounds) == 3  # a failed round leaves the history as it was

    dropping = _sibling(session, overflow="drop_oldest")
    dropping.replay(history)
    with caplog.at_level("WARNING"):
        res = dropping.round(prompt.user_text, seed=3, options=dropping.options(max_new_tokens=max_new))
    assert res.dropped_rounds == [0] and "rounds[0] (text only) left out of the cache" in caplog.text
    assert dropping.history.rounds[-1].metadata["sample"]["dropped_rounds"] == [0]
    assert len(dropping.history.rounds) == 4  # the history itself keeps every round
    dropping.flush()
    kept = dataclasses.replace(dropping.history, rounds=dropping.history.rounds[1:])
    assert _cache_ids(dropping) == t.encode(kept, add_generation_prompt=False).input_ids[:-1].tolist()


# ----------------------------------------------------------------------------------------------------------
# sample.py
# ----------------------------------------------------------------------------------------------------------
def _copy_example(folder: Path) -> Path:
    shutil.copytree(EXAMPLE.parent, folder, dirs_exist_ok=True)
    return folder / EXAMPLE.name


@pytest.fixture(scope="module")
def single_run(ckpt, tmp_path_factory):
    """sample.py on the example conversation; returns (input file, its bytes before, output dir)."""
    chat = _copy_example(tmp_path_factory.mktemp("chat"))
    before = chat.read_bytes()
    out = tmp_path_factory.mktemp("out") / "run"
    rc = _sample_main()(["--checkpoint", str(ckpt), "--chat", str(chat), "--out", str(out), "--devices", "1",
                         "--no-progress", "--max-new-tokens", "4", "--force-image"])
    assert rc == 0
    return chat, before, out


def test_sample_cli_writes_images_history_and_transcript(single_run):
    chat, before, out = single_run
    assert chat.read_bytes() == before  # the input is never modified
    done = schema_io.load_conversation(out / chat.name)  # validates; every image file is readable
    original = schema_io.load_conversation(chat)
    assert len(done.rounds) == 3 and not schema.pending_rounds(done)
    assert [r.user_text for r in done.rounds] == [r.user_text for r in original.rounds]
    assert [p.name for p in done.people] == [p.name for p in original.people]
    html = (out / "transcript.html").read_text()
    for where, im in schema.iter_images(done):
        assert (out / im.path).is_file() and f'src="{im.path}"' in html, where
    assert all(r.assistant_image is not None for r in done.rounds)  # --force-image
    assert all(r.metadata["sample"]["seed"] == k for k, r in enumerate(done.rounds))
    # identity: Maya's face reference (drawn-person metadata) in round 1, and again in round 2 which names her;
    # Julian has no face reference
    identity = [r.metadata["sample"]["identity"] for r in done.rounds]
    assert identity[0].startswith("identity: Maya") and identity[1].startswith("identity: Maya (face reference")
    assert identity[2].startswith("no identity")


@pytest.mark.long
def test_sample_cli_batches_jsonl_over_the_mesh_like_single_runs(ckpt, single_run, tmp_path):
    """Two conversations in one JSONL, one batch of two rows over a 2-device mesh: each comes out as when it
    runs alone on one device."""
    chat, _, single_out = single_run
    folder = tmp_path / "in"
    chat = _copy_example(folder)
    first = json.loads(chat.read_text())
    second = copy.deepcopy(first)
    second["id"] = "two_friends_b"
    second["rounds"][1]["user_text"] = "Show Maya in the snow."
    (folder / "both.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    out = tmp_path / "out"
    rc = _sample_main()(["--checkpoint", str(ckpt), "--chat", str(folder / "both.jsonl"), "--out", str(out),
                         "--devices", "2", "--batch-size", "2", "--no-progress", "--max-new-tokens", "4",
                         "--force-image"])
    assert rc == 0
    alone = schema.with_pixels(schema_io.load_conversation(single_out / "two_friends.json"))
    batched = schema.with_pixels(schema_io.load_conversation(out / f"{first['id']}.json"))
    assert schema_io.load_conversation(out / "two_friends_b.json").rounds[1].user_text == "Show Maya in the snow."
    for a, b in zip(alone.rounds, batched.rounds):
        assert a.assistant_text == b.assistant_text
        assert (a.assistant_image is None) == (b.assistant_image is None)
        if a.assistant_image is not None:
            assert np.abs(a.assistant_image.pixels.astype(int) - b.assistant_image.pixels.astype(int)).max() <= 1


def test_sample_cli_interactive_saves_after_every_round(ckpt, tmp_path, monkeypatch, capsys):
    lines = iter(["/help", "Draw Maya at the beach.", f"/image {EXAMPLE.parent / 'images' / 'maya.png'}",
                  "/bogus", "This is Maya. Show her in the snow.", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = tmp_path / "out"
    rc = _sample_main()(["--checkpoint", str(ckpt), "--out", str(out), "--interactive", "--devices", "1",
                         "--no-progress", "--max-new-tokens", "2", "--force-image"])
    printed = capsys.readouterr().out
    assert rc == 0 and printed.count("assistant> ") == 2
    assert printed.count("'/help' shows this") == 2 and "unknown command /bogus" in printed  # answered here
    chat = schema_io.load_conversation(out / "chat.json")
    assert [r.user_text for r in chat.rounds] == ["Draw Maya at the beach.", "This is Maya. Show her in the snow."]
    assert len(chat.rounds[1].user_images) == 1 and all(r.assistant_image is not None for r in chat.rounds)
    assert (out / "transcript.html").is_file()
    for r in chat.rounds:  # each answer names the file its image went to
        assert f"images/{Path(r.assistant_image.path).name}]" in printed
    mask = os.umask(0)
    os.umask(mask)
    assert {oct(f.stat().st_mode & 0o777) for f in out.rglob("*") if f.is_file()} == {oct(0o666 & ~mask)}


def _bad_inputs(folder: Path, ckpt: Path) -> dict:
    """name -> (history file, extra args, what the one-line error must say)."""
    chat = _copy_example(folder)
    d = json.loads(chat.read_text())

    def variant(name, mutate):
        dd = copy.deepcopy(d)
        mutate(dd)
        path = folder / f"{name}.json"
        path.write_text(json.dumps(dd, indent=1))
        return path

    (folder / "garbage.png").write_bytes(b"this is not a png")
    PILImage.new("CMYK", (16, 16), (0, 50, 100, 0)).save(folder / "cmyk.jpg")
    malformed = folder / "malformed.json"
    malformed.write_text(chat.read_text()[:-20])
    swap = lambda p: (lambda dd: dd["rounds"][0]["user_images"][0].__setitem__("path", p))  # noqa: E731
    long_history = variant("long", lambda dd: dd["rounds"][0].__setitem__(
        "user_text", dd["rounds"][0]["user_text"] + " Maya is here." * 60))
    return {
        "malformed JSON": (malformed, [], [str(malformed), "malformed JSON at line"]),
        "missing image": (variant("missing", swap("images/nope.png")), [],
                          ["missing.json", "rounds[0].user_images[0].path: file not found: images/nope.png"]),
        "undecodable image": (variant("undecodable", swap("garbage.png")), [],
                              ["undecodable.json", "rounds[0].user_images[0].path: cannot decode image garbage.png"]),
        "unsupported mode": (variant("cmyk", swap("cmyk.jpg")), [],
                             ["cmyk.json", "rounds[0].user_images[0].path: unsupported image mode 'CMYK'"]),
        "checkpoint does not match": (chat, ["--set", "model.llm.num_layers=3"], ["model.llm.num_layers"]),
        "missing checkpoint": (chat, ["--checkpoint", str(folder / "no_such_run")],
                               ["no_such_run: checkpoint directory not found"]),
        "history too long": (long_history, ["--max-len", "256"], ["long.json", "rounds[0]", "KV-cache slots"]),
    }


def test_bad_input_is_one_line_exit_2_nothing_written(ckpt, tmp_path, capsys):
    cases = _bad_inputs(tmp_path / "in", ckpt)
    main = _sample_main()
    for name, (chat, extra, expected) in cases.items():
        before = chat.read_bytes()
        out = tmp_path / "out" / name.replace(" ", "_")
        capsys.readouterr()
        rc = main(["--checkpoint", str(ckpt), "--chat", str(chat), "--out", str(out), "--devices", "1",
                   "--no-progress"] + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, name
        assert len(err) == 1 and err[0].startswith("python sample.py: error: "), (name, err)
        for piece in expected:
            assert piece in err[0], (name, err[0])
        assert chat.read_bytes() == before, name  # byte-identical
        assert not out.exists(), name  # nothing written


def test_transcript_renders_in_headless_chromium(single_run, tmp_path):
    """The transcript's images show in a browser: headless Chromium's screenshot holds each image's pixels."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import screenshot_transcript as shot
    finally:
        sys.path.pop(0)
    if shot.find_chromium() is None:
        assert not os.environ.get("CIG_REQUIRE_CHROMIUM"), "CIG_REQUIRE_CHROMIUM is set but chromium is missing"
        pytest.skip("chromium is not installed (apt-get install chromium)")
    _, _, out = single_run
    report = shot.check(out / "transcript.html", tmp_path / "shot.png")
    assert report["images"] >= 2 and report["rendered"] == report["images"], report


# ----------------------------------------------------------------------------------------------------------
# Face backends and several identities per image
# ----------------------------------------------------------------------------------------------------------
def test_sample_cli_refuses_a_face_backend_of_the_wrong_width(tmp_path, capsys):
    """dlib gives 128-d embeddings; a checkpoint trained on 512-d ArcFace ones refuses it before sampling."""
    pytest.importorskip("dlib")
    from conftest import save_tiny_checkpoint

    ckpt512 = save_tiny_checkpoint(tmp_path / "run512", ["model.dit.identity.embedding_dim=512"])
    chat = _copy_example(tmp_path / "in")
    out = tmp_path / "out"
    rc = _sample_main()(["--checkpoint", str(ckpt512), "--chat", str(chat), "--out", str(out), "--devices", "1",
                         "--no-progress", "--identity-backend", "dlib"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and not out.exists(), err
    assert "--identity-backend dlib" in err[0] and "128-d" in err[0] and "512-d" in err[0], err[0]


def test_insightface_pack_misplacements_are_explained(tmp_path):
    from cig_jax.faces.identity import IdentityModelNotFoundError
    from cig_jax.sample.identities import embedder_for_checkpoint

    nested = tmp_path / "root" / "models" / "buffalo_l" / "buffalo_l"
    nested.mkdir(parents=True)
    (nested / "w600k_r50.onnx").write_bytes(b"")
    for backend in ("insightface", "auto"):  # auto does not fall back to dlib past a pack the user put there
        with pytest.raises(IdentityModelNotFoundError, match=r"nested one folder too deep.*move the \.onnx files up"):
            embedder_for_checkpoint(backend, 512, tmp_path / "root")
    flat = tmp_path / "flat" / "buffalo_l"
    flat.mkdir(parents=True)
    (flat / "det_10g.onnx").write_bytes(b"")
    with pytest.raises(IdentityModelNotFoundError, match=r"insightface looks in <model_root>/models/<pack>/"):
        embedder_for_checkpoint("insightface", 512, tmp_path / "flat")
    with pytest.raises(IdentityModelNotFoundError, match=r"is the folder that holds models/buffalo_l/, not the pack"):
        embedder_for_checkpoint("insightface", 512, flat)


def _face_photo(who_box, side=160) -> np.ndarray:
    insightface = pytest.importorskip("insightface")
    t1 = PILImage.open(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").convert("RGB")
    x0, y0, x1, y1 = who_box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    return np.asarray(t1.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half))).resize((side, side)))


def test_two_person_round_with_two_face_photos_uses_both(ckpt, tmp_path):
    """Round 1 gives two named photos (real faces, embedded by dlib); round 2 names both: both identities are
    used, each bound to its side of the image, and the history JSON says so."""
    pytest.importorskip("dlib")
    folder = tmp_path / "in"
    (folder / "images").mkdir(parents=True)
    for name, box in (("ann", (1118, 283, 1227, 391)), ("ben", (67, 283, 176, 391))):
        PILImage.fromarray(_face_photo(box)).save(folder / "images" / f"{name}.png")
    chat = {"id": "two_photos", "kind": "chat", "rounds": [
        {"user_text": "This is Ann. This is Ben. Draw Ann and Ben together at the beach.",
         "user_images": [{"path": "images/ann.png", "people": [{"name": "Ann"}]},
                         {"path": "images/ben.png", "people": [{"name": "Ben"}]}]},
        {"user_text": "Now Ben and Ann in the snow."}]}
    (folder / "chat.json").write_text(json.dumps(chat))
    out = tmp_path / "out"
    rc = _sample_main()(["--checkpoint", str(ckpt), "--chat", str(folder / "chat.json"), "--out", str(out),
                         "--devices", "1", "--no-progress", "--max-new-tokens", "2", "--force-image",
                         "--identity-backend", "dlib"])
    assert rc == 0
    done = json.loads((out / "chat.json").read_text())
    first, second = (r["metadata"]["sample"] for r in done["rounds"])
    assert [i["name"] for i in first["identities"]] == ["Ann", "Ben"], first
    assert all("face found by dlib" in i["source"] for i in first["identities"]), first
    assert [i["name"] for i in second["identities"]] == ["Ben", "Ann"], second  # the order the text names them
    assert all("face reference of rounds[0]" in i["source"] for i in second["identities"]), second
    for rec in (first, second):  # left and right halves
        assert [i["box"] for i in rec["identities"]] == [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]
    assert first["identity"].startswith("identity: Ann")
