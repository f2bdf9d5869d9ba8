#!/usr/bin/env python
"""Web app: chat with a trained checkpoint in the browser (Gradio; `pip install -e .[app]`).

    python app.py --checkpoint workdir/demo/stage3            # then open http://127.0.0.1:7860

Every browser session gets its own chat (its own history and KV cache; the weights are shared read-only);
requests are queued and run one at a time. Each turn takes text and one image; the answer's image shows inline.
Per-round controls: seed, guidance scales, diffusion steps, force an image; undo the last round, reset, load a
history JSON (ours or the Hugging Face / OpenAI `messages` form) and download the history + transcript.
"""
from __future__ import annotations

import argparse
import sys
import tempfile


def _args(argv):
    ap = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="training workdir: DIR/checkpoints/<step>/ and DIR/tokenizer/")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 exposes it to the network)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--max-len", type=int, default=2048, help="KV-cache slots per browser session")
    ap.add_argument("--files", help="folder for the sessions' images and exports (default: a temporary folder)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _args(argv)
    from cig_jax.sample.session import ChatSession

    try:
        base = ChatSession.from_checkpoint(args.checkpoint, step=args.step, max_len=args.max_len)
    except FileNotFoundError as e:
        print(f"app.py: {e}", file=sys.stderr)
        return 2
    from cig_jax.app.ui import launch

    root = args.files or tempfile.mkdtemp(prefix="cig_app_")
    print(f"app.py: serving on http://{args.host}:{args.port} (files under {root})")
    launch(base, root, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
