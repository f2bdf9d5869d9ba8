"""A trained run's checkpoint -> released-format folders: the command line over `convert.export.write_parts`.

    python -m cig_jax.train.export --checkpoint workdir/demo/stage3 --out exported/ [--step N] [--skip vae,dit]

Owns: reading the run (its saved config, the parameters of a step, the configs of the runs it started from:
`stage_history`) and the command. Does not own: the layout of the folders and the inverse name mappings
(`cig_jax/convert/export.py`, which imports nothing of train/), the checkpoint format (`checkpoint.py`).
"""
from __future__ import annotations

from pathlib import Path

import jax

from cig_jax import cli, sharding
from cig_jax.config import MeshConfig
from cig_jax.convert import export as layout
from cig_jax.convert.export import PARTS, missing_extras, write_parts
from cig_jax.train.checkpoint import load_trained, read_config, saved_config


def stage_history(workdir: str | Path, limit: int = 10) -> list[dict]:
    """The saved configs of this run and of the runs it started from (train.init_from), oldest first."""
    out, seen = [], set()
    w = Path(workdir)
    while w and str(w) not in seen and len(out) < limit and (w / "checkpoints").is_dir():
        seen.add(str(w))
        c = read_config(w / "checkpoints")
        out.append(c)
        w = Path(c.get("train", {}).get("init_from") or "") if c.get("train", {}).get("init_from") else None
    return out[::-1]


def export(checkpoint: str | Path, out: str | Path, *, step: int | None = None, mesh=None,
           skip: tuple = ()) -> list[str]:
    """Writes every exportable part of the run under `checkpoint` into `out` (but those in `skip`); returns the
    folders written. A part whose layout needs a missing extra is a `MissingExtra` before anything is written."""
    checkpoint = Path(checkpoint)
    cfg = saved_config(checkpoint, source="--checkpoint")
    missing_extras(cfg, skip)
    mesh = mesh or sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = load_trained(cfg, step=step, mesh=mesh, workdir=checkpoint)
    return write_parts(model, cfg, checkpoint / "tokenizer", out, stage_history(checkpoint), skip)


def main(argv=None) -> list[str]:
    ap = cli.parser(cli.prog(module="cig_jax.train.export"), "A trained run -> released-format folders, for what its "
                    "checkpoint holds.\n\n" + layout.__doc__.split("\n\n")[3])
    ap.add_argument("--checkpoint", required=True, help="the run's workdir (holds checkpoints/ and tokenizer/)")
    ap.add_argument("--out", required=True, help="folder to write the parts into (llm/, vit/, vae/, dit/, ...)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--skip", default="", metavar="PARTS",
                    help=f"comma-separated parts not to export, from {', '.join(PARTS)} (e.g. vae,dit "
                         "where the 'export' extra is not installed)")
    args = ap.parse_args(argv)
    skip = tuple(p.strip() for p in args.skip.split(",") if p.strip())
    unknown = [p for p in skip if p not in PARTS]
    if unknown:
        raise cli.UserError(f"--skip {args.skip}: unknown part(s) {', '.join(unknown)}")
    written = export(args.checkpoint, args.out, step=args.step, skip=skip)
    print(f"[export] {', '.join(written)} -> {args.out}")
    return written


if __name__ == "__main__":
    cli.run_main(main)
