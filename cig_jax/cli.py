"""How every command line of the project talks to its user.

Owns: the conventions all entry points share (`train.py`, `sample.py`, `app.py`, `python -m cig_jax.eval.run`,
the benchmarks and data builders): `prog` showing the command a user types, dashed long flags, defaults shown in
`--help`, a repeatable `--set KEY=VALUE`, and one-line errors with exit status 2 for what a user can fix (a bad
config, a missing file, a missing optional extra) instead of a stack trace.

Does not own: what any command does, or the config format (`cig_jax.config`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence


class MissingExtra(ImportError):
    """An optional feature whose packages are not installed; the message names the extra that brings them."""


def require(module: str, extra: str, feature: str):
    """Imports `module`, or raises `MissingExtra` saying which extra of cig_jax installs it.

    require("dlib", "face", "the dlib face embedder") -> the dlib module, or
    MissingExtra("the dlib face embedder needs the 'face' extra: pip install -e '.[face]' (module dlib is missing)")
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{feature} needs the '{extra}' extra: pip install -e '.[{extra}]' "
                           f"(module {e.name or module} is missing)") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (where it has a meaningful one) and keeps the description's own line breaks."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        default = action.default
        if ("%(default)" in help_text or default in (None, False, [], "", argparse.SUPPRESS)
                or action.option_strings == [] and action.nargs in ("?", "*")):
            return help_text
        return f"{help_text} (default: %(default)s)"


def prog(script: Optional[str] = None, module: Optional[str] = None, console: Optional[str] = None) -> str:
    """The command a user typed: 'python train.py', 'python -m cig_jax.eval.run' or the console script 'cig-train'."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if console and invoked == console:
        return console
    if script and invoked == script:
        return f"python {script}"
    if module:
        return f"python -m {module}"
    return f"python {script}" if script else (console or invoked)


def parser(prog_name: str, description: str, epilog: Optional[str] = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog_name, description=description, epilog=epilog,
                                   formatter_class=HelpFormatter)


def add_overrides(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override a config key, e.g. --set train.steps=20 (repeatable)")


def fail(prog_name: str, message: str) -> int:
    """Prints one line for the user and returns the exit status for errors a user can fix."""
    print(f"{prog_name}: error: {message}", file=sys.stderr)
    return 2


def run_main(main, argv: Optional[Sequence[str]] = None) -> None:
    """`sys.exit(main(argv))`, turning a `MissingExtra` into one line and exit status 2."""
    try:
        code = main(argv)
    except MissingExtra as e:
        code = fail(os.path.basename(sys.argv[0]) if sys.argv else "cig_jax", str(e))
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        sys.stderr.close()
        code = 0
    sys.exit(code or 0)
