#!/usr/bin/env python
"""Sampling entry point. For now: continue a text prompt with a trained LLM checkpoint directory in
Hugging Face layout (the chat-history sampler replaces this: `--chat history.json --out OUT`).

    python sample.py --checkpoint DIR --prompt-ids 1,2,3 [--max-new-tokens 20]
"""
import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="directory with config.json + *.safetensors")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    args = ap.parse_args(argv)
    try:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    except ValueError:
        print(f"sample.py: --prompt-ids must be comma-separated integers, got {args.prompt_ids!r}", file=sys.stderr)
        return 2
    import jax.numpy as jnp

    from cig_jax.convert.checkpoint_io import CheckpointError
    from cig_jax.convert.hf_llm import load_hf_llm
    from cig_jax.sample.decode import greedy_generate

    try:
        model = load_hf_llm(args.checkpoint)
    except CheckpointError as e:
        print(f"sample.py: {e}", file=sys.stderr)
        return 2
    out = greedy_generate(model, jnp.asarray([prompt]), max_new_tokens=args.max_new_tokens,
                          cache_len=len(prompt) + args.max_new_tokens)
    print(" ".join(str(int(t)) for t in out[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
