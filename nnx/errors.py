"""User-facing errors and the one wrapper every nnx_* command runs through.

Bad input raises :class:`NNXError` with one line that names the file (or thing) and the problem. The wrapper
prints ``<prog>: error: <line>`` to stderr and exits non-zero, without a traceback unless ``--debug`` is given
(or ``NNX_DEBUG=1``).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from typing import Callable, Optional, Sequence


class NNXError(Exception):
    """An error caused by the user's input. ``str(err)`` is the single line shown to the user."""

    exit_code = 2

    def __init__(self, message: str, path: Optional[str] = None):
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors as one-line :class:`NNXError` (printed by :func:`cli_entry`, exit code 2)."""

    def error(self, message: str):
        raise NNXError(f"{message} (see {self.prog} -h)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def cli_entry(prog: str) -> Callable[[Callable[[Optional[Sequence[str]]], Optional[int]]], Callable[..., int]]:
    """Decorator for console-script ``main(argv=None)`` functions.

    * removes ``--debug`` from argv (and sets ``NNX_DEBUG=1`` so child code can see it);
    * :class:`NNXError` -> one line on stderr, exit code 2;
    * KeyboardInterrupt -> exit 130;
    * any other exception -> one line with the exception type and message plus a ``--debug`` hint, exit 1.
    """

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(argv: Optional[Sequence[str]] = None) -> int:
            args = list(sys.argv[1:] if argv is None else argv)
            debug = os.environ.get("NNX_DEBUG", "") not in ("", "0")
            if "--debug" in args:
                args.remove("--debug")
                debug = True
                os.environ["NNX_DEBUG"] = "1"
            try:
                rc = fn(args)
                return int(rc or 0)
            except NNXError as e:
                if debug:
                    traceback.print_exc()
                print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
                return e.exit_code
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            except SystemExit:
                raise
            except Exception as e:  # noqa: BLE001 - last line of defence for a CLI
                if debug:
                    traceback.print_exc()
                print(f"{prog}: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
                      file=sys.stderr)
                return 1

        return wrapper

    return deco
