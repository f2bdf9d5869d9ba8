"""The sampling command line (`python sample.py`, or `cig-sample`): a trained checkpoint + a chat history -> the answers, as images, a history and a transcript.

    python sample.py --checkpoint workdir/demo/stage3 --chat examples/two_friends.json --out out/
    python sample.py --checkpoint DIR --chat DIR_OF_JSON_OR_FILE.jsonl --out OUT   # many conversations, batched
    python sample.py --checkpoint DIR --out OUT --interactive [--chat history.json]

Every round that has a user turn but no assistant output is sampled (round r with seed --seed + r). Into OUT go
the completed history (`<name>.json`, the input's file name; one per conversation), the images (`images/*.png`,
each carrying how it was made in its PNG text chunk `cig_jax`, as the round's metadata.sample in the JSON does)
and `transcript.html`, the conversations as a chat with the images inline. The input is never modified. Each
conversation is written as soon as it is complete, every file atomically and its JSON last, so after a crash
the JSONs on disk are finished conversations and `--skip-existing` samples only the rest (with the same
results: each conversation's seeds depend only on --seed). Conversations of the same shape (rounds, pending
rounds) are sampled together, up to --batch-size at a time, their rows sharded over the mesh. `--num-images N`
draws N candidates per round in one batch (different seeds); the history goes on with the first, the others
are saved as `images/<id>_r<r>_a_c<k>.png` and listed in the round's metadata.sample.candidates. Histories are
our JSON (see README, "Chat-history JSON") or the Hugging Face / OpenAI `messages` form.

Face photos without a recorded identity are embedded by --identity-backend (auto: an insightface pack under
--face-model-root/models/<pack>/ when there, else dlib; `none`: identities only from the records); a backend whose
width is not the checkpoint's, or a misplaced pack, is an error before sampling. A round naming several people
with face references draws with all of them (up to model.dit.identity.max_identities), listed in the history.

Bad input (malformed JSON, a missing / undecodable / unsupported image, a checkpoint that does not fit the
config, a history longer than --max-len under --overflow error) is a one-line error naming the file, round and
field, with exit status 2 and nothing written. `--interactive` chats in the terminal (`/image PATH` attaches an
image to the next message, `/help` lists the commands, `/quit` ends) and saves the same outputs after every round,
naming the files it wrote.
"""
from __future__ import annotations

import json
from pathlib import Path

from cig_jax import cli, sharding
from cig_jax.config import override_config
from cig_jax.config_io import load_config
from cig_jax.data import schema, schema_io, sources
from cig_jax.faces import backends
from cig_jax.sample import complete as C, session as S
from cig_jax.sample.identities import embedder_for_checkpoint
from cig_jax.sample.options import RoundOptions, round_seed
from cig_jax.sample.transcript import write_transcript
from cig_jax.train import checkpoint as train_checkpoint
from cig_jax.train.checkpoint import saved_config


def _args(argv):
    ap = cli.parser(cli.prog(script="sample.py", console="cig-sample"),
                    "Continue chat histories with a trained checkpoint: each pending round's answer as text and an "
                    "image,\nthe completed history JSON and transcript.html in --out.\n\n" + __doc__.split("\n\n")[1])
    ap.add_argument("--checkpoint", required=True, help="training workdir: DIR/checkpoints/<step>/ and DIR/tokenizer/")
    ap.add_argument("--chat", help="history JSON (ours or a `messages` list), a directory of them, or a JSONL file "
                    "(one conversation a line)")
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--interactive", action="store_true", help="chat in the terminal")
    ap.add_argument("--config", help="YAML config to use instead of the one saved with the checkpoint")
    cli.add_overrides(ap, "override a key of the checkpoint's config, e.g. --set diffusion.num_steps=8")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--seed", type=int, help="round r samples with seed + r (default: sample.seed)")
    ap.add_argument("--max-new-tokens", type=int, help="text tokens per answer at most (default: sample.max_new_tokens)")
    ap.add_argument("--temperature", type=float, help="0: greedy (default: sample.temperature)")
    ap.add_argument("--top-p", type=float, help="nucleus sampling mass (default: sample.top_p)")
    ap.add_argument("--num-steps", type=int, help="diffusion steps (default: diffusion.num_steps)")
    ap.add_argument("--visual-scale", type=float, help="visual guidance scale (default: diffusion.visual_guidance_scale)")
    ap.add_argument("--identity-scale", type=float,
                    help="identity guidance scale (default: diffusion.identity_guidance_scale)")
    ap.add_argument("--force-image", action="store_true", help="draw in every round")
    ap.add_argument("--num-images", type=int, default=1, help="candidate images per round (different seeds, batched)")
    ap.add_argument("--skip-existing", action="store_true",
                    help="keep conversations whose output JSON is already complete in --out; sample the rest")
    ap.add_argument("--max-len", type=int, default=2048, help="KV-cache slots for the history")
    ap.add_argument("--overflow", choices=("error", "drop_oldest"), default="error",
                    help="when the history outgrows --max-len: fail, or drop the oldest text-only rounds")
    ap.add_argument("--batch-size", type=int, default=8, help="conversations sampled together")
    ap.add_argument("--devices", type=int, help="devices of the mesh (default: all)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--identity-backend", choices=backends.choices(none=True), default="auto",
                    help="face embedder for photos without a recorded identity (auto: insightface if its pack is "
                         "found, else dlib); its width must be the checkpoint's")
    ap.add_argument("--face-model-root", help="folder holding models/<pack>/*.onnx (default: ~/.insightface)")
    ap.add_argument("--face-pack", default="buffalo_l", help="insightface pack name (buffalo_l, antelopev2)")
    args = ap.parse_args(argv)
    if not args.interactive and not args.chat:
        ap.error("--chat is required (or use --interactive)")
    if args.num_images < 1:
        ap.error("--num-images must be >= 1")
    return args


def _load_chats(path: Path) -> list:
    """(conversation, output file name) pairs from a JSON file, a directory of JSON files, or a JSONL file."""
    return sources.open_files(path)


def _config(args):
    """The config to sample with: --config or the checkpoint's own, with --set overrides."""
    if args.config:
        return load_config(args.config, args.overrides)
    if not Path(args.checkpoint).is_dir():
        raise FileNotFoundError(f"{args.checkpoint}: checkpoint directory not found")
    return override_config(saved_config(args.checkpoint, source="checkpoint"), args.overrides,
                           f"checkpoint {args.checkpoint} + --set")


def _round_options(args, cfg) -> RoundOptions:
    """The flags' sampling knobs over the config's: resolved once, passed whole."""
    return RoundOptions.resolve(cfg, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, num_steps=args.num_steps, visual_scale=args.visual_scale,
                                identity_scale=args.identity_scale, force_image=args.force_image)


def _save_one(out: Path, conv, name: str):
    """Writes one completed conversation into `out`: candidate PNGs, then the images and the JSON (last)."""

    stem, png_text = schema_io.safe_name(conv.id), {}
    for r, rnd in enumerate(conv.rounds):
        sample = rnd.metadata.get("sample") if isinstance(rnd.metadata, dict) else None
        if not isinstance(sample, dict):
            continue
        for k, cand in enumerate(sample.get("candidates", []), 1):
            im = cand.get("image")
            if isinstance(im, schema.Image):
                rel = f"images/{stem}_r{r}_a_c{k}.png"
                made = {key: v for key, v in dict(sample, seed=cand["seed"], stop=cand["stop"]).items()
                        if key != "candidates"}
                schema_io.atomic_write(out / rel, schema.encode_png(im.pixels, {"cig_jax": json.dumps(made)}))
                cand["image"] = rel
        made = {key: v for key, v in sample.items() if key != "candidates"}
        png_text[f"rounds[{r}].assistant_image"] = {"cig_jax": json.dumps(made)}
    return schema_io.save_conversation(conv, out / name, png_text=png_text)


def _write(out: Path, done: list) -> list:
    """Saves each (conversation, name) into `out` (JSON + images) and the transcript of them all; returns the
    conversations as saved (their image paths relative to `out`)."""
    saved = [_save_one(out, conv, name) for conv, name in done]
    _write_transcript(out, saved)
    return saved


def _write_transcript(out: Path, saved: list) -> None:
    write_transcript(out / "transcript.html", saved, title=", ".join(c.id for c in saved) or "Transcript")


def _existing(out: Path, name: str):
    """The complete conversation already saved as out/name, or None (missing, unreadable or pending rounds)."""

    try:
        conv = schema_io.load_conversation(out / name)
    except schema.SchemaError:
        return None
    return None if schema.pending_rounds(conv) else conv


def _check_outputs(out: Path, chats: list) -> None:

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

    user_errors = (cli.UserError, FileNotFoundError)
    prog = cli.prog(script="sample.py", console="cig-sample")
    out = Path(args.out)
    try:
        # --- everything that can be checked before sampling: input, config, checkpoint, context -------------
        chats = _load_chats(Path(args.chat)) if args.chat else []
        _check_outputs(out, chats)
        cfg = _config(args)
        _, template = train_checkpoint.checkpoint_parts(args.checkpoint, cfg)
        options = _round_options(args, cfg)
        if args.overflow == "error":
            for batch in _batches(chats, args.batch_size):
                for k in batch:
                    C.check_context(template, chats[k][0], args.max_len, options.max_new_tokens,
                                    batch_size=len(batch) * args.num_images)
        embedder = False
        if cfg.model.dit.identity_injection != "none":
            embedder = embedder_for_checkpoint(args.identity_backend, cfg.model.dit.identity.embedding_dim,
                                               args.face_model_root, args.face_pack)
        devices = jax.devices()[: args.devices] if args.devices else jax.devices()
        session = S.ChatSession.from_checkpoint(
            args.checkpoint, config=cfg, step=args.step, mesh=sharding.make_mesh(cfg.mesh, devices),
            max_len=args.max_len, overflow=args.overflow, progress=not args.no_progress, identity_embedder=embedder)
        # --- sampling: each conversation is written as soon as it is complete -----------------------------------
        seed = args.seed if args.seed is not None else cfg.sample.seed
        if args.interactive:
            return _interactive(session, chats[0] if chats else None, out, seed, options)
        kept = {}
        if args.skip_existing:
            kept = {k: conv for k, (_, name) in enumerate(chats) if (conv := _existing(out, name)) is not None}
        again = [name for k, (_, name) in enumerate(chats) if k not in kept and (out / name).exists()]
        if again:
            print(f"{prog}: {out} already holds {', '.join(again[:3])}{' ...' if len(again) > 3 else ''}: "
                  f"overwriting {len(again)} conversation(s) (--skip-existing keeps the complete ones)", flush=True)
        sampled = _complete_all(session, chats, seed, args, kept, out, options)
    except user_errors as e:
        return cli.fail(prog, str(e))
    skipped = f" (kept {len(kept)} already complete)" if kept else ""
    print(f"{prog}: wrote {sampled} conversation(s){skipped} and transcript.html to {out}")
    return 0


def _batches(chats: list, batch_size: int) -> list:
    """Indices into `chats`, in batches of at most `batch_size` conversations of the same shape."""
    groups: dict = {}
    for k, (conv, _) in enumerate(chats):
        groups.setdefault(C.shape_of(conv), []).append(k)
    size = max(batch_size, 1)
    return [members[i:i + size] for members in groups.values() for i in range(0, len(members), size)]


def _complete_all(first, chats: list, seed: int, args, kept: dict, out: Path, options: RoundOptions) -> int:
    """Completes every conversation not in `kept` (index -> saved conversation), batching those of the same shape,
    and writes each batch's conversations as soon as they are done (the transcript too, of all so far). Returns
    how many were sampled."""
    todo = [k for k in range(len(chats)) if k not in kept]
    total = sum(len(schema.pending_rounds(chats[k][0])) for k in todo)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="rounds", unit="round")
    saved: dict = dict(kept)
    sessions = {1: first}
    n = args.num_images
    for batch in _batches([chats[k] for k in todo], args.batch_size):
        batch = [todo[i] for i in batch]
        b = len(batch) * n
        if b not in sessions:  # the same weights, another batch size
            sessions[b] = first.with_batch_size(b)
        convs = [chats[k][0] for k in batch]
        tick = (lambda r, res: bar.update(len(res))) if bar is not None else None
        done = C.complete_conversations(sessions[b], convs, seed=seed, on_round=tick, num_images=n, options=options)
        for k, conv in zip(batch, done):
            saved[k] = _save_one(out, conv, chats[k][1])
        _write_transcript(out, [saved[k] for k in sorted(saved)])
    if not todo:
        _write_transcript(out, [saved[k] for k in sorted(saved)])
    if bar is not None:
        bar.close()
    return len(todo)


INTERACTIVE_HELP = ("Type a message and press Enter; commands (never sent to the model): '/image PATH' attaches an "
                    "image to the next message, '/help' shows this, '/quit' ends (so does Ctrl-D).")


def _interactive(session, chat, out: Path, seed: int, options: RoundOptions) -> int:
    """A terminal chat, starting from `chat` ((conversation, name) or None). Saves the history, images and
    transcript into `out` after every round."""
    import dataclasses

    if chat is not None:
        conv, name = chat
        conv = C.complete_conversation(session, conv, seed=seed, options=options)
        _write(out, [(conv, name)])
        for r, rnd in enumerate(conv.rounds):
            print(f"[{r + 1}] you> {rnd.user_text}\n[{r + 1}] assistant> {rnd.assistant_text or ''}")
    else:
        conv, name = schema.Conversation(id="chat", kind="chat", source="sample.py --interactive"), "chat.json"
    print(INTERACTIVE_HELP)
    attached: list = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        cmd = line.strip()
        if cmd in ("/quit", "/exit"):
            break
        if cmd in ("/help", "/?"):
            print(INTERACTIVE_HELP)
            continue
        if cmd.startswith("/") and cmd.split()[0] != "/image":
            print(f"unknown command {cmd.split()[0]} (not sent to the model); /help lists the commands")
            continue
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
        result = session.round(line, attached, seed=round_seed(seed, len(conv.rounds)), options=options)
        attached = []
        done = session.history.rounds[-1]  # user images keep their paths: saving copies the files
        conv.rounds.append(dataclasses.replace(
            done, user_images=[dataclasses.replace(im, pixels=None) if im.path else im for im in done.user_images]))
        saved = _write(out, [(conv, name)])[0]
        image = saved.rounds[-1].assistant_image
        drawn = f"  [image: {Path(image.path) if Path(image.path).is_absolute() else out / image.path}]" \
            if result.image is not None and image is not None and image.path else ""
        print(f"assistant> {result.text}{drawn}  [history: {out / name}]")
    return 0


def console() -> None:
    """The `cig-sample` console script (the same command as `python sample.py`)."""
    cli.run_main(main)


if __name__ == "__main__":
    console()
