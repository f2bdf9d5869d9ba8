#!/usr/bin/env python
"""Sampling entry point: a trained checkpoint + a chat history -> the answers, as images, a history and a transcript.

    python sample.py --checkpoint workdir/demo/stage3 --chat examples/two_friends.json --out out/
    python sample.py --checkpoint DIR --chat DIR_OF_JSON_OR_FILE.jsonl --out OUT   # many conversations, batched
    python sample.py --checkpoint DIR --out OUT --interactive [--chat history.json]

Every round that has a user turn but no assistant output is sampled (round r with seed --seed + r). Into OUT go
the completed history (`<name>.json`, the input's file name; one per conversation), the images (`images/*.png`)
and `transcript.html`, the conversations as a chat with the images inline. The input is never modified; files
are written atomically, and only once every conversation is done. Conversations of the same shape (rounds,
pending rounds) are sampled together, up to --batch-size at a time, their rows sharded over the mesh.

Face photos without a recorded identity are embedded by --identity-backend (auto: an insightface pack under
--face-model-root/models/<pack>/ when there, else dlib; `none`: identities only from the records); a backend whose
width is not the checkpoint's, or a misplaced pack, is an error before sampling. A round naming several people
with face references draws with all of them (up to model.dit.identity.max_identities), listed in the history.

Bad input (malformed JSON, a missing / undecodable / unsupported image, a checkpoint that does not fit the
config, a history longer than --max-len under --overflow error) is a one-line error naming the file, round and
field, with exit status 2 and nothing written. `--interactive` chats in the terminal (`/image PATH` attaches an
image to the next message, `/quit` ends) and saves the same outputs after every round.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="training workdir: DIR/checkpoints/<step>/ and DIR/tokenizer/")
    ap.add_argument("--chat", help="history JSON, a directory of them, or a JSONL file (one conversation a line)")
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--interactive", action="store_true", help="chat in the terminal")
    ap.add_argument("--config", help="YAML config to use instead of the one saved with the checkpoint")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--seed", type=int, help="round r samples with seed + r (default: sample.seed)")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float, help="0: greedy")
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--num-steps", type=int, help="diffusion steps")
    ap.add_argument("--visual-scale", type=float, help="visual guidance scale")
    ap.add_argument("--identity-scale", type=float, help="identity guidance scale")
    ap.add_argument("--force-image", action="store_true", help="draw in every round")
    ap.add_argument("--max-len", type=int, default=2048, help="KV-cache slots for the history")
    ap.add_argument("--overflow", choices=("error", "drop_oldest"), default="error",
                    help="when the history outgrows --max-len: fail, or drop the oldest text-only rounds")
    ap.add_argument("--batch-size", type=int, default=8, help="conversations sampled together")
    ap.add_argument("--devices", type=int, help="devices of the mesh (default: all)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--identity-backend", choices=("auto", "insightface", "dlib", "none"), default="auto",
                    help="face embedder for photos without a recorded identity (auto: insightface if its pack is "
                         "found, else dlib); its width must be the checkpoint's")
    ap.add_argument("--face-model-root", help="folder holding models/<pack>/*.onnx (default ~/.insightface)")
    ap.add_argument("--face-pack", default="buffalo_l", help="insightface pack name (buffalo_l, antelopev2)")
    args = ap.parse_args(argv)
    if not args.interactive and not args.chat:
        ap.error("--chat is required (or use --interactive)")
    return args


def _load_chats(path: Path) -> list:
    """(conversation, output file name) pairs from a JSON file, a directory of JSON files, or a JSONL file."""
    from cig_jax.data import schema

    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise schema.SchemaError(f"{path}: no *.json conversations in this directory")
        return [(schema.load_conversation(f), f.name) for f in files]
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise schema.SchemaError(f"{path}: conversation file not found")
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise schema.SchemaError(f"{where}: malformed JSON at column {e.colno}: {e.msg}") from None
            conv = schema.conversation_from_dict(d, source=where, base_dir=path.parent)
            schema.validate(conv)
            out.append((conv, schema._safe(conv.id or f"line{n}") + ".json"))
        if not out:
            raise schema.SchemaError(f"{path}: no conversations in this file")
        return out
    return [(schema.load_conversation(path), path.name)]


def _config(args):
    """The config to sample with: --config or the checkpoint's own, with --set overrides."""
    from cig_jax.config import Config, apply_override, from_dict, load_config, to_dict, validate
    from cig_jax.train.trainer import saved_config

    if args.config:
        return load_config(args.config, args.set)
    if not Path(args.checkpoint).is_dir():
        raise FileNotFoundError(f"{args.checkpoint}: checkpoint directory not found")
    cfg = saved_config(args.checkpoint, source="checkpoint")
    if not args.set:
        return cfg
    tree = to_dict(cfg)
    for ov in args.set:
        tree = apply_override(tree, ov)
    cfg = from_dict(Config, tree, source=f"checkpoint {args.checkpoint} + --set")
    validate(cfg, "--set")
    return cfg


def _round_options(args) -> dict:
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                num_steps=args.num_steps, visual_scale=args.visual_scale, identity_scale=args.identity_scale)
    opts = {k: v for k, v in opts.items() if v is not None}
    if args.force_image:
        opts["force_image"] = True
    return opts


def _write(out: Path, done: list) -> None:
    """Saves each (conversation, name) into `out` (JSON + images) and the transcript of them all."""
    from cig_jax.data import schema
    from cig_jax.sample.transcript import write_transcript

    saved = [schema.save_conversation(conv, out / name) for conv, name in done]
    write_transcript(out / "transcript.html", saved, title=", ".join(c.id for c in saved) or "Transcript")


def _check_outputs(out: Path, chats: list) -> None:
    from cig_jax.data import schema

    if out.exists() and not out.is_dir():
        raise schema.SchemaError(f"--out {out}: exists and is not a directory")
    names = [name for _, name in chats]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise schema.SchemaError(f"two conversations would both be written to {out / dup}; give them distinct ids")
    for conv, name in chats:
        if conv.file and (out / name).resolve() == Path(conv.file).resolve():
            raise schema.SchemaError(f"{conv.file}: --out {out} would overwrite the input; choose another directory")


def main(argv=None) -> int:
    args = _args(argv)
    import jax

    from cig_jax import sharding
    from cig_jax.config import ConfigError
    from cig_jax.data import schema
    from cig_jax.sample import session as S
    from cig_jax.sample.identities import IdentityDimensionError, embedder_for_checkpoint
    from cig_jax.train.checkpoint import CheckpointMismatchError

    user_errors = (schema.SchemaError, FileNotFoundError, CheckpointMismatchError, ConfigError, S.ContextOverflowError,
                   IdentityDimensionError)
    out = Path(args.out)
    try:
        # --- everything that can be checked before sampling: input, config, checkpoint, context -------------
        chats = _load_chats(Path(args.chat)) if args.chat else []
        _check_outputs(out, chats)
        cfg = _config(args)
        _, template = S.checkpoint_parts(args.checkpoint, cfg)
        max_new = args.max_new_tokens if args.max_new_tokens is not None else cfg.sample.max_new_tokens
        if args.overflow == "error":
            for batch in _batches(chats, args.batch_size):
                for k in batch:
                    S.check_context(template, chats[k][0], args.max_len, max_new, batch_size=len(batch))
        embedder = False
        if cfg.model.dit.identity_injection != "none":
            embedder = embedder_for_checkpoint(args.identity_backend, cfg.model.dit.identity.embedding_dim,
                                               args.face_model_root, args.face_pack)
        devices = jax.devices()[: args.devices] if args.devices else jax.devices()
        session = S.ChatSession.from_checkpoint(
            args.checkpoint, config=cfg, step=args.step, mesh=sharding.make_mesh(cfg.mesh, devices),
            max_len=args.max_len, overflow=args.overflow, progress=not args.no_progress, identity_embedder=embedder)
        # --- sampling: outputs are written only once everything is done ---------------------------------------
        seed = args.seed if args.seed is not None else cfg.sample.seed
        if args.interactive:
            return _interactive(session, chats[0] if chats else None, out, seed, args)
        done = _complete_all(session, chats, seed, args)
    except user_errors as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    _write(out, done)
    print(f"sample.py: wrote {len(done)} conversation(s) and transcript.html to {out}")
    return 0


def _batches(chats: list, batch_size: int) -> list:
    """Indices into `chats`, in batches of at most `batch_size` conversations of the same shape."""
    from cig_jax.sample import session as S

    groups: dict = {}
    for k, (conv, _) in enumerate(chats):
        groups.setdefault(S.shape_of(conv), []).append(k)
    size = max(batch_size, 1)
    return [members[i:i + size] for members in groups.values() for i in range(0, len(members), size)]


def _complete_all(first, chats: list, seed: int, args) -> list:
    """Completes every conversation, batching those of the same shape; returns (conversation, name) pairs."""
    from cig_jax.data import schema
    from cig_jax.sample import session as S

    total = sum(len(schema.pending_rounds(conv)) for conv, _ in chats)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="rounds", unit="round")
    done: dict = {}
    sessions = {1: first}
    opts = _round_options(args)
    for batch in _batches(chats, args.batch_size):
        b = len(batch)
        if b not in sessions:  # the same weights, another batch size
            sessions[b] = first.with_batch_size(b)
        convs = [chats[k][0] for k in batch]
        tick = (lambda r, res: bar.update(len(res))) if bar is not None else None
        for k, conv in zip(batch, S.complete_conversations(sessions[b], convs, seed=seed, on_round=tick, **opts)):
            done[k] = (conv, chats[k][1])
    if bar is not None:
        bar.close()
    return [done[k] for k in range(len(chats))]


def _interactive(session, chat, out: Path, seed: int, args) -> int:
    """A terminal chat, starting from `chat` ((conversation, name) or None). Saves the history, images and
    transcript into `out` after every round."""
    import dataclasses

    from cig_jax.data import schema
    from cig_jax.sample import session as S

    opts = _round_options(args)
    if chat is not None:
        conv, name = chat
        conv = S.complete_conversation(session, conv, seed=seed, **opts)
        _write(out, [(conv, name)])
        for r, rnd in enumerate(conv.rounds):
            print(f"[{r + 1}] you> {rnd.user_text}\n[{r + 1}] assistant> {rnd.assistant_text or ''}")
    else:
        conv, name = schema.Conversation(id="chat", kind="chat", source="sample.py --interactive"), "chat.json"
    print("Type a message; '/image PATH' attaches an image to the next one; '/quit' ends.")
    attached: list = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        cmd = line.strip()
        if cmd in ("/quit", "/exit"):
            break
        if cmd.startswith("/image"):
            path = cmd[len("/image"):].strip()
            try:
                attached.append(schema.Image(path=str(Path(path).resolve()), pixels=schema.read_image(path, "/image")))
                print(f"(attached {path})")
            except schema.SchemaError as e:
                print(f"sample.py: {e}")
            continue
        if not cmd and not attached:
            continue
        result = session.round(line, attached, seed=seed + len(conv.rounds), **opts)
        attached = []
        done = session.history.rounds[-1]  # user images keep their paths: saving copies the files
        conv.rounds.append(dataclasses.replace(
            done, user_images=[dataclasses.replace(im, pixels=None) if im.path else im for im in done.user_images]))
        _write(out, [(conv, name)])
        drawn = f"  [image saved under {out / 'images'}]" if result.image is not None else ""
        print(f"assistant> {result.text}{drawn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
