"""How every command line of the project talks to its user.

Owns: the conventions all entry points share (`train.py`, `sample.py`, `app.py`, `python -m cig_jax.eval.run`,
the benchmarks and data builders): `prog` showing the command a user types, dashed long flags, defaults shown in
`--help`, a repeatable `--set KEY=VALUE`, and one-line errors with exit status 2 for what a user can fix (a bad
config, a missing file, a missing optional extra) instead of a stack trace. `UserError` is the base of every
error a user can act on (config, chat history, checkpoint, missing extra); `run_main` turns it, a
`FileNotFoundError` or a `SystemExit("message")` into that one line. Importing it quiets transformers' "PyTorch was not found" advice.

Does not own: what any command does, or the config format (`cig_jax.config`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

# transformers (tokenizers only: the base install has no PyTorch) would print "PyTorch was not found. Models won't
# be available..." on import; nothing here uses its models, so every command asks it not to.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class UserError(Exception):
    """An error a user can fix from the command line; its message names the file, field or flag."""


class MissingExtra(UserError, ImportError):
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
        if ("%(default)" in help_text or "default" in help_text.lower()
                or default is None or default is False or default in ([], "", argparse.SUPPRESS)
                or action.option_strings == [] and action.nargs in ("?", "*")):
            return help_text
        return f"{help_text} (default: %(default)s)"


def invoked() -> str:
    """The command this process runs, from sys.argv[0]: 'python -m cig_jax.eval.run', 'python sample.py' or
    'cig-sample'."""
    path = sys.argv[0] if sys.argv and sys.argv[0] else "cig_jax"
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if path.endswith(".py") and "cig_jax" in parts[:-1]:
        module = parts[len(parts) - 1 - parts[::-1].index("cig_jax"):]
        return "python -m " + ".".join(module)[: -len(".py")]
    name = os.path.basename(path)
    return f"python {name}" if name.endswith(".py") else name


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


def add_overrides(ap: argparse.ArgumentParser, help: str = "override a config key, e.g. --set train.steps=20") -> None:
    """The repeatable `--set KEY=VALUE` every command with a config takes (into `args.overrides`)."""
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help=f"{help} (repeatable)")


def fail(prog_name: str, message: str) -> int:
    """Prints one line for the user and returns the exit status for errors a user can fix."""
    message = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{prog_name}: error: {message}", file=sys.stderr)
    return 2


def _file_message(e: OSError) -> str:
    """'nowhere/x.json: no such file or directory' from a FileNotFoundError (or its own message)."""
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror.lower()}"
    return str(e)


def run_main(main, argv: Optional[Sequence[str]] = None) -> None:
    """`sys.exit(main(argv))`, turning what a user can fix (a `UserError`, a missing file, a `SystemExit` with a
    message) into one line on stderr and exit status 2, and Ctrl-C into one line and 130."""
    try:
        code = main(argv)
    except UserError as e:
        code = fail(invoked(), str(e))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        code = fail(invoked(), _file_message(e))
    except SystemExit as e:  # a message: one line, exit 2 (or the exception's own `status`, e.g. a failed check's 1)
        code = e.code
        if isinstance(e.code, str):
            fail(invoked(), e.code)
            code = getattr(e, "status", 2)
    except KeyboardInterrupt:
        print(f"{invoked()}: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        sys.stderr.close()
        code = 0
    sys.exit(code if isinstance(code, int) else 0)
