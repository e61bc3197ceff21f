"""User mistakes, one exception type: the command line and the stages print its message as
one line, `error: <file or param>: <what is wrong, what was expected>`, and exit with 2.
Every other exception is a bug and keeps its traceback. `--traceback` (the CLI) or
ICLEVR_DDPM_TRACEBACK=1 shows tracebacks for user mistakes too."""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path


class UserError(ValueError):
    """A mistake in the user's input (a file, a param, a label, a model folder).

    The message starts with the file or param it concerns.
    """


TRACEBACK_ENV = "ICLEVR_DDPM_TRACEBACK"


def _one_line(e: Exception) -> str | None:
    """The message of a user mistake on one line, or None for a bug."""
    if isinstance(e, UserError):
        return " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename:  # a path given by the user that cannot be opened
        return f"{e.filename}: {e.strerror}"
    return None


def guarded(fn, *args, traceback: bool = False) -> int:
    """Run fn(*args); 0 on success, 2 after printing a user mistake as one line."""
    try:
        fn(*args)
        return 0
    except Exception as e:
        msg = _one_line(e)
        if msg is None or traceback or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2


def run_stage(main, doc: str, argv: list[str] | None = None) -> None:
    """A stage script's entry: -h/--help prints its docstring; a wrong number of arguments or a
    user mistake is one `error:` line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(doc.strip())
        sys.exit(0)
    want = len(inspect.signature(main).parameters)

    def call():
        if len(argv) != want:
            usage = next((line.strip() for line in doc.splitlines() if line.startswith("Usage:")), "")
            raise UserError(f"{Path(sys.argv[0]).name}: {len(argv)} arguments, expected {want}. {usage}")
        main(*argv)
    sys.exit(guarded(call))
