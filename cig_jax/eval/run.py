"""Evaluating a trained checkpoint: held-out conversations -> generated rounds -> `metrics.json` + a PNG grid.

Owns: reading held-out conversations (a split of an array_record build, a folder of conversation JSON files,
or a fresh synthetic draw), the generation protocol (`generate_rounds`: which history each generated round
sees), the picture of the results (`grid_image`: per round the generated image beside the ground truth), the
printed table (`format_table`) and the CLI:

    python -m cig_jax.eval.run --checkpoint workdir/demo/stage3 --data validation --out workdir/demo/eval
        [--data-dir workdir/demo/data] [--num 16] [--kinds name_based] [--view history|markov]
        [--context truth|generated] [--num-steps 20] [--identity auto|dlib|insightface|none]

prints the per-round table and writes OUT/metrics.json and OUT/samples.png.

Does not own: the metrics (`metrics.py`), the attribute classifier (`attributes.py`), sampling and the KV
cache (`cig_jax/sample/session.py`), the Markov view of a conversation (`cig_jax/data/pipeline.markov_view`).

Protocol. Every round of every conversation is generated with `force_image`, so each round has an image to
score. `view`: 'history' gives the model the whole conversation so far (one session per batch of
conversations); 'markov' gives it what `data.markov_view` trains on: a fresh context holding only the round's
text, its own user images and, before them, the previous round's image. `context`: 'truth' (default) puts
the ground-truth earlier rounds in that history (teacher forcing: round r is judged on its own, and an
attribute shown only in the round-1 image is determined for later rounds by the ground truth, so it can be
scored against it); 'generated' runs freely on the model's own earlier answers (then only the round-1 text
and `consistency` say whether a later round got the person right). Previous-round images given to the Markov
view carry no drawn-person metadata, so no identity is read off them (the history view has none either).
Round r of conversation i uses seed `seed + 1000 i + r`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from cig_jax import cli
from cig_jax.config import override_config
from cig_jax.data import names as name_pools
from cig_jax.data import recall as recall_data
from cig_jax.data import schema, sources
from cig_jax.eval import metrics, probe_embeddings, recall
from cig_jax.data.schema import Conversation
from cig_jax.data.pipeline import markov_view
from cig_jax.eval.attributes import load_or_train_classifier
from cig_jax.faces import backends
from cig_jax.sample.complete import complete_conversations, context_needed
from cig_jax.sample.options import RoundOptions
from cig_jax.sample.session import ChatSession
from cig_jax.train.checkpoint import checkpoint_parts

VIEWS = ("history", "markov")
CONTEXTS = ("truth", "generated")
HELDOUT_SEED = 9_100_000  # synthetic draws for evaluation: a stream no training config uses
DEFAULT_KINDS = ("recall",)


# ----------------------------------------------------------------------------------------------------------
# Held-out conversations
# ----------------------------------------------------------------------------------------------------------
def load_conversations(data: str, *, data_dir: str = "workdir/demo/data", num: Optional[int] = None,
                       kinds: Sequence[str] = DEFAULT_KINDS, seed: int = HELDOUT_SEED, size: int = 64,
                       names: str = "heldout") -> list:
    """The conversations to evaluate, every image with its pixels loaded, at most `num`, only `kinds` (empty:
    all). `data`: a folder of conversation JSON files or a JSONL file, 'synthetic' (a fresh draw of `num`
    conversations from `seed`; the recall kind's people are named from the `names` pool, by default names no
    training draw uses), or a split name ('validation', 'train') of the array_record build under `data_dir`
    (opened by `cig_jax.data.sources`)."""
    kinds = tuple(kinds)
    if data == "synthetic" or Path(data).exists():
        convs = sources.open_records(data, num=num, seed=seed, size=size, kinds=kinds, names=names)
    else:
        convs = sources.open_records("tfds", data_dir=data_dir, split=data, num=num, kinds=kinds)
    convs = [convs[i] for i in range(len(convs))]
    if not convs:
        raise ValueError(f"--data {data}: no conversations of kinds {list(kinds)} found")
    return [schema.with_pixels(c) for c in convs]


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------
def _ask(conv: Conversation, r: int, view: str, previous: Optional[np.ndarray]) -> Conversation:
    """The conversation whose pending last round is round r as the model sees it under `view` (the history
    policy): 'history': the ground-truth rounds before r, then round r; 'markov': round r alone, the previous
    round's image (`previous`, uint8; bare pixels, so no identity is read off it) first among its user images, as
    `pipeline.markov_view` places it."""
    pending = dataclasses.replace(conv.rounds[r], assistant_text=None, assistant_image=None, metadata={})
    if view == "history":
        return dataclasses.replace(conv, rounds=list(conv.rounds[:r]) + [pending])
    if r > 0 and previous is not None:
        prev = dataclasses.replace(conv.rounds[r - 1], assistant_image=schema.Image(pixels=previous))
        pending = markov_view(dataclasses.replace(conv, rounds=[prev, pending])).rounds[0]
    return dataclasses.replace(conv, rounds=[pending])


def _pixels(image) -> Optional[np.ndarray]:
    return None if image is None else image.pixels


def _asks(conv: Conversation, view: str, context: str, only_last: bool) -> list:
    """What `generate_rounds` completes for `conv` (previous images from the ground truth: to size the cache)."""
    if view == "history" and context == "generated":
        return [dataclasses.replace(conv, rounds=[_ask(conv, r, view, None).rounds[-1] for r in range(len(conv.rounds))])]
    rounds = [len(conv.rounds) - 1] if only_last else range(len(conv.rounds))
    return [_ask(conv, r, view, None if r == 0 else _pixels(conv.rounds[r - 1].assistant_image)) for r in rounds]


def generate_rounds(session, convs: Sequence[Conversation], *, view: str = "history", context: str = "truth",
                    seed: int = 0, on_batch=None, only_last: bool = False,
                    options: Optional[RoundOptions] = None, texts: Optional[list] = None) -> list:
    """Per conversation, per round, the generated image (uint8 [H, W, 3], or None): `len(convs)` lists. With
    `texts` (a list), also the answers' texts, appended per conversation in the same layout.

    The generation protocol of sample.py (`complete_conversations`) under a history policy (`_ask`; see the
    module docstring for `view` and `context`): conversation i completes from base seed `seed + 1000 i`
    (`options.round_seed`: its round r samples with seed + 1000 i + r), every round with `force_image`.
    `session`: a `ChatSession`; its `batch_size` conversations of the same length are generated at once
    (conversations are grouped by length, the order of the result is that of `convs`; a short last batch is
    padded with copies). `only_last`: generate only each conversation's last round (ground-truth context; the
    counterfactual probe). options: the round's knobs (None: the config's)."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    if only_last and context != "truth":
        raise ValueError("only_last needs context 'truth' (earlier rounds come from the ground truth)")
    options = dataclasses.replace(session.options() if options is None else options, force_image=True)
    b = session.batch_size
    by_length: dict = {}
    for i, c in enumerate(convs):
        by_length.setdefault(len(c.rounds), []).append(i)
    out: list = [None] * len(convs)
    said: list = [None] * len(convs)
    done = 0
    for n_rounds, members in by_length.items():
        for start in range(0, len(members), b):
            idx = members[start:start + b]
            chunk = [convs[i] for i in idx]
            n_real = len(chunk)
            chunk += [chunk[-1]] * (b - n_real)
            bases = [seed + 1000 * (idx[i] if i < n_real else idx[-1] + i - n_real + 1) for i in range(b)]
            gen = [[None] * n_rounds for _ in chunk]
            answers = [[None] * n_rounds for _ in chunk]
            session.reset()
            if view == "history" and context == "generated":  # the model's own answers: one completion
                filled = complete_conversations(session, [_asks(c, view, context, False)[0] for c in chunk],
                                                seed=bases, options=options)
                gen = [[_pixels(rnd.assistant_image) for rnd in c.rounds] for c in filled]
                answers = [[rnd.assistant_text for rnd in c.rounds] for c in filled]
            else:
                for r in range(n_rounds - 1 if only_last else 0, n_rounds):
                    prev = [None if r == 0 else gen[i][r - 1] if context == "generated" else
                            _pixels(c.rounds[r - 1].assistant_image) for i, c in enumerate(chunk)]
                    asks = [_ask(c, r, view, p) for c, p in zip(chunk, prev)]
                    # a Markov context holds round r alone: its base seed moves on by r, as the round index would
                    filled = complete_conversations(session, asks, options=options,
                                                    seed=bases if view == "history" else [s + r for s in bases])
                    for i, c in enumerate(filled):
                        gen[i][r], answers[i][r] = _pixels(c.rounds[-1].assistant_image), c.rounds[-1].assistant_text
            for i, g, a in zip(idx, gen[:n_real], answers[:n_real]):
                out[i], said[i] = g, a
            done += n_real
            if on_batch is not None:
                on_batch(done, len(convs))
    if texts is not None:
        texts.extend(said)
    return out


# ----------------------------------------------------------------------------------------------------------
# Picture
# ----------------------------------------------------------------------------------------------------------
def caption_font(size: int = 11):
    """A scalable font that draws names beyond ASCII (DejaVu Sans where installed, else PIL's own scalable
    default; the bitmap default draws 'Zoë' or 'Łucja' as boxes)."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def wrap_to_width(text: str, font, width: int, max_lines: int) -> list:
    """`text` in lines no wider than `width` pixels in `font`; beyond `max_lines` the last line ends in '…'."""
    lines: list = []
    for word in text.split():
        while font.getlength(word) > width:  # a word wider than the cell: break it
            cut = max(1, max(k for k in range(1, len(word) + 1) if font.getlength(word[:k]) <= width or k == 1))
            lines.append(word[:cut])
            word = word[cut:]
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        elif word:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "…"]
    return lines


def grid_image(truth: Sequence[Conversation], generated: Sequence[Sequence], cell: int = 96,
               text_lines: int = 4) -> PILImage.Image:
    """One row per conversation; per round two cells, the generated image ('rN gen') then the ground truth
    ('rN truth'), captioned with the round's user text (wrapped to the two cells; '…' where it goes on). Missing
    images are grey."""
    font = caption_font()
    line = 13
    cap = line * (text_lines + 1) + 4
    cols = max(len(c.rounds) for c in truth)
    pad = 6
    width = cols * (2 * cell + 3 * pad) + pad
    sheet = PILImage.new("RGB", (width, len(truth) * (cell + cap + pad) + pad), (255, 255, 255))
    d = ImageDraw.Draw(sheet)

    def tile(px):
        if px is None:
            return PILImage.new("RGB", (cell, cell), (160, 160, 160))
        return PILImage.fromarray(np.asarray(px, np.uint8)).resize((cell, cell), PILImage.NEAREST)

    for row, (conv, gen) in enumerate(zip(truth, generated)):
        y = pad + row * (cell + cap + pad)
        for r, rnd in enumerate(conv.rounds):
            x = pad + r * (2 * cell + 3 * pad)
            truth_px = rnd.assistant_image.pixels if rnd.assistant_image is not None else None
            for k, (px, label, colour) in enumerate(((gen[r], f"r{r + 1} gen", (0, 110, 0)),
                                                     (truth_px, f"r{r + 1} truth", (0, 0, 160)))):
                sheet.paste(tile(px), (x + k * (cell + pad), y))
                d.text((x + k * (cell + pad), y + cell + 1), label, fill=colour, font=font)
            for k, text in enumerate(wrap_to_width(rnd.user_text or "", font, 2 * cell + pad, text_lines)):
                d.text((x, y + cell + 1 + line * (k + 1)), text, fill=(40, 40, 40), font=font)
    return sheet


# ----------------------------------------------------------------------------------------------------------
# Scoring and the table
# ----------------------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "   -" if x is None else f"{100 * x:4.0f}"


def table_rows(report: dict) -> list:
    """Per round: (round, people, text acc, text chance, image-only acc, image-only chance, drawn-identity
    cosine, face-identity cosine or None, face pairs scored / pairs)."""
    att = report["attributes"]
    drawn = {e["round"]: e["mean"] for e in report.get("drawn_identity", {}).get("rounds", [])}
    face = {e["round"]: e for e in (report.get("identity") or {}).get("rounds", [])}
    rows = []
    for e in att["rounds"]:
        r = e["round"]
        f = face.get(r, {})
        rows.append((r, e["people"], e["text"]["accuracy"], e["text"]["chance"], e["image_only"]["accuracy"],
                     e["image_only"]["chance"], drawn.get(r), f.get("mean"), f"{f.get('n', 0)}/{f.get('pairs', 0)}"))
    return rows


def format_table(reports: dict) -> str:
    """A text table, one line per (model, round): attribute accuracy (%) of text-described and image-only
    attributes with their chance levels, the drawn-identity cosine and the face-embedder identity cosine."""
    head = (f"{'model':<10} {'round':>5} {'people':>6} | {'text':>4} {'chance':>6} | {'image-only':>10} {'chance':>6} | "
            f"{'drawn-id':>8} | {'face-id':>7} {'scored':>7}")
    lines = [head, "-" * len(head)]
    for name, report in reports.items():
        for r, n, ta, tc, ia, ic, di, fi, fn in table_rows(report):
            lines.append(f"{name:<10} {r + 1:>5} {n:>6} | {_pct(ta):>4} {_pct(tc):>6} | {_pct(ia):>10} {_pct(ic):>6} | "
                         f"{'-' if di is None else f'{di:.3f}':>8} | {'-' if fi is None else f'{fi:.3f}':>7} {fn:>7}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# A checkpoint, end to end
# ----------------------------------------------------------------------------------------------------------
def make_embedder(identity: str):
    """The face embedder for identity similarity ('none': None). Cartoon faces mostly go undetected: the
    failures are counted in the report."""
    if identity == "none":
        return None
    if identity == "auto" and not any(backends.installed(b) for b in backends.embedders()):
        print("[eval] identity similarity not computed: no face backend installed (pip install -e '.[face]')",
              flush=True)
        return None
    need = backends.BACKENDS[backends.embedders()[-1] if identity == "auto" else identity]  # auto falls back last
    if need.module:
        cli.require(need.module, need.extra, f"--identity {identity}")
    return backends.make_identity_embedder(identity)


def context_for(checkpoint, convs: Sequence[Conversation], batch_size: int, multiple: int = 256) -> int:
    """KV-cache slots that hold any batch of `convs` under any view and context, rounded up to `multiple`: what an
    evaluation sizes its session to when not told (`complete.context_needed` of every conversation
    `generate_rounds` may complete, with the checkpoint's max_new_tokens)."""
    cfg, template = checkpoint_parts(checkpoint)
    asks = [a for c in convs for view, context in (("history", "generated"), ("history", "truth"), ("markov", "truth"))
            for a in _asks(c, view, context, False)]
    need = context_needed(template, asks, cfg.sample.max_new_tokens, batch_size)
    return -(-need // multiple) * multiple


def evaluate_checkpoint(checkpoint, data: str = "validation", out=None, *, data_dir: str = "workdir/demo/data",
                        num: Optional[int] = 16, kinds: Sequence[str] = DEFAULT_KINDS, view: str = "history",
                        context: str = "truth", seed: int = 0, batch_size: int = 8, max_len: Optional[int] = None,
                        num_steps: Optional[int] = None, classifier=None, classifier_cache: str = "/tmp/cig_eval",
                        identity: str = "auto", embedder=None, convs: Optional[Sequence[Conversation]] = None,
                        grid_rows: int = 8, verbose: bool = True, names: str = "heldout", probe: bool = True,
                        overrides: Sequence[str] = ()) -> dict:
    """Generates the held-out conversations with the checkpoint under `view` / `context`, scores them and, with
    `out`, writes OUT/metrics.json and OUT/samples.png (the first `grid_rows` conversations). `convs` replaces
    loading from `data` (`names`: the name pool of a synthetic draw). With `probe` and recall conversations
    under the history view, also the counterfactual name probe (`eval/recall.py`). Returns the report (the JSON
    written). `overrides` (`--set KEY=VALUE`) change the checkpoint's config (sampling and diffusion settings)."""
    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    cfg, _ = checkpoint_parts(checkpoint)  # a missing checkpoint or tokenizer stops here, before any work
    cfg = override_config(cfg, overrides, f"checkpoint {checkpoint} + --set")
    if convs is None:
        convs = load_conversations(data, data_dir=data_dir, num=num, kinds=kinds, names=names)
    convs = list(convs)
    if classifier is None:
        classifier = load_or_train_classifier(classifier_cache, verbose=verbose)
    if embedder is None:
        embedder = make_embedder(identity)
    batch_size = max(1, min(batch_size, len(convs)))
    if max_len is None:
        max_len = context_for(checkpoint, convs, batch_size)
    session = ChatSession.from_checkpoint(checkpoint, config=cfg, max_len=max_len, batch_size=batch_size,
                                          identity_embedder=False)
    t_gen = time.perf_counter()
    texts: list = []
    options = session.options(num_steps=num_steps, force_image=True)
    generated = generate_rounds(session, convs, view=view, context=context, seed=seed, options=options,
                                texts=texts,
                                on_batch=lambda n, total: say(f"[eval] generated {n}/{total} conversations "
                                                              f"({time.perf_counter() - t_gen:.0f}s)", flush=True))
    t_score = time.perf_counter()
    report = metrics.evaluate(convs, generated, classifier=classifier, embedder=embedder)
    report["names"] = metrics.names_copied(convs, texts)
    if probe and view == "history" and any(recall.is_recall(c) for c in convs):
        t_probe = time.perf_counter()
        pairs = recall_data.probe_pairs(convs)
        report["probe"] = recall.run_probe(session, pairs, classifier, generate=generate_rounds, seed=seed,
                                             options=options)
        report["probe"]["embeddings"] = probe_embeddings.run(session, pairs, batch_size)
        say(f"[eval] counterfactual name probe: {len(convs)} pairs ({time.perf_counter() - t_probe:.0f}s)")
    report["checkpoint"] = str(checkpoint)
    report["data"] = str(data)
    report["protocol"] = {"view": view, "context": context, "seed": seed, "kinds": list(kinds),
                          "num_steps": options.num_steps, "force_image": True}
    report["timing_s"] = {"generate": round(t_score - t_gen, 1), "score": round(time.perf_counter() - t_score, 1),
                          "total": round(time.perf_counter() - t0, 1)}
    report = metrics.json_safe(report)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
        grid_image(convs[:grid_rows], generated[:grid_rows]).save(out / "samples.png")
        say(f"[eval] wrote {out / 'metrics.json'} and {out / 'samples.png'}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = cli.parser(cli.prog(module="cig_jax.eval.run", console="cig-eval"),
                    "Evaluate a trained checkpoint on held-out conversations.")
    ap.add_argument("--checkpoint", required=True, help="a training workdir (e.g. workdir/demo/stage3)")
    cli.add_overrides(ap, "override a key of the checkpoint's config, e.g. --set sample.max_new_tokens=32")
    ap.add_argument("--data", default="validation",
                    help="a split of the array_record build under --data-dir, a folder of conversation JSON files, "
                         "or 'synthetic' (a fresh held-out draw)")
    ap.add_argument("--data-dir", default="workdir/demo/data",
                    help="the array_record build whose split --data names (train.py's recipe writes it)")
    ap.add_argument("--out", required=True, help="where metrics.json and samples.png go")
    ap.add_argument("--num", type=int, default=16, help="at most this many conversations")
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="comma-separated kinds ('' for all)")
    ap.add_argument("--names", default="heldout", choices=name_pools.POOLS,
                    help="--data synthetic: the name pool of the recall kind ('heldout': names no training draw uses)")
    ap.add_argument("--no-probe", action="store_true", help="skip the counterfactual name probe")
    ap.add_argument("--view", default="history", choices=VIEWS,
                    help="what the model reads each round: the whole history, or (markov) only the last round "
                         "with the previous image")
    ap.add_argument("--context", default="truth", choices=CONTEXTS,
                    help="earlier rounds' answers in the history: the ground truth's, or the model's own")
    ap.add_argument("--seed", type=int, default=0, help="round r of a conversation samples with seed + r")
    ap.add_argument("--batch-size", type=int, default=8, help="conversations generated at once")
    ap.add_argument("--max-len", type=int, default=None,
                    help="KV-cache slots per conversation (default: what its batches need, each round at its "
                         "longest row plus max_new_tokens, rounded up to 256; eval.run.context_for)")
    ap.add_argument("--num-steps", type=int, help="diffusion steps (default: the checkpoint's config)")
    ap.add_argument("--cache", default="/tmp/cig_eval",
                    help="where the attribute classifier is cached (trained once on synthetic images, a few "
                         "minutes on CPU, the first time)")
    ap.add_argument("--identity", default="auto", choices=backends.choices(none=True),
                    help="face embedder for identity similarity (auto: dlib when the 'face' extra is installed, "
                         "else skipped)")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    report = evaluate_checkpoint(args.checkpoint, args.data, args.out, data_dir=args.data_dir, num=args.num,
                                 kinds=kinds, view=args.view, context=args.context, seed=args.seed,
                                 batch_size=args.batch_size, max_len=args.max_len, num_steps=args.num_steps,
                                 classifier_cache=args.cache, identity=args.identity, names=args.names,
                                 probe=not args.no_probe, overrides=args.overrides)
    print(format_table({args.view: report}))
    if "recall" in report:
        print(recall.format_recall({args.view: report}))
    print("chance levels per attribute: " + ", ".join(f"{k} {v:.2f}" for k, v in report["attributes"]["chance"].items()))
    names = report.get("names") or {}
    if names.get("rounds"):
        print(f"names copied intact: {names['intact']:.0%} of {names['rounds']} answers to a round that names someone")
    return 0


def console() -> None:
    """The `cig-eval` console script."""
    cli.run_main(main)


if __name__ == "__main__":
    console()
