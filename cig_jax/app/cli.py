"""The web app's command line (`python app.py`): a checkpoint served as a Gradio chat in the browser.

    python app.py --checkpoint workdir/demo/stage3            # then open http://127.0.0.1:7860

Every browser session gets its own chat (its own history and KV cache; the weights are shared read-only);
requests are queued and run one at a time. Each turn takes text and one image; the answer's image shows inline.
Per-round controls: seed, guidance scales, diffusion steps, force an image; undo the last round, reset, load a
history (a zip the app downloaded, or a JSON, ours or the Hugging Face / OpenAI `messages` form, with its images
beside it) and download the chat as a zip (history JSON + images + transcript).

Owns: the flags and their checks before anything is loaded. Does not own: the page (`cig_jax/app/ui.py`) or what a
round does (`cig_jax/app/chat.py`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from cig_jax import cli
from cig_jax.config import override_config
from cig_jax.sample.session import ChatSession
from cig_jax.train.checkpoint import saved_config


def main(argv=None) -> int:
    prog = cli.prog(script="app.py")
    ap = cli.parser(prog, __doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2])
    ap.add_argument("--checkpoint", required=True, help="training workdir: DIR/checkpoints/<step>/ and DIR/tokenizer/")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    cli.add_overrides(ap, "override a key of the checkpoint's config, e.g. --set diffusion.num_steps=8")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 exposes it to the network)")
    ap.add_argument("--port", type=int, default=7860, help="port to serve on")
    ap.add_argument("--max-len", type=int, default=2048, help="KV-cache slots per browser session")
    ap.add_argument("--files", help="folder for the sessions' images and exports (default: a temporary folder)")
    args = ap.parse_args(argv)
    if not Path(args.checkpoint).is_dir():
        return cli.fail(prog, f"--checkpoint {args.checkpoint}: checkpoint directory not found")

    cfg = override_config(saved_config(args.checkpoint, source="checkpoint"), args.overrides, "--set")
    cli.require("gradio", "app", "the web app")
    from cig_jax.app.ui import launch  # gradio: the 'app' extra, checked above

    base = ChatSession.from_checkpoint(args.checkpoint, config=cfg, step=args.step, max_len=args.max_len)
    root = args.files or tempfile.mkdtemp(prefix="cig_app_")
    print(f"{prog}: serving on http://{args.host}:{args.port} (files under {root})")
    launch(base, root, host=args.host, port=args.port)
    return 0
