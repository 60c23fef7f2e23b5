"""Command-line entry points on absl + ml_collections config files: errors as one line, exit status 2.

ml_collections reads `--config=FILE` and `--config.KEY=VALUE` while absl parses the
flags, before the tool's own `main` runs, and reports a missing file, a file that
fails to import or build, or an unknown key as a traceback. `run_absl` turns each
into one `error: ...` line naming the problem and what to do, exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Sequence


def config_file_problem(argv: Sequence[str]) -> Optional[str]:
    """One line naming a `--config=FILE` of `argv` that does not exist (else None).

    `FILE:ARG` (an argument to the config file's get_config) is accepted, as ml_collections does.
    """
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith("--config="):
            value = a.split("=", 1)[1]
        else:
            continue
        path = Path(value.split(":", 1)[0]).expanduser()
        if not path.is_file():
            near = sorted(p.name for p in path.parent.glob("*.py")) if path.parent.is_dir() else []
            hint = f" (in {path.parent}: {', '.join(near)})" if near else ""
            return f"config file not found: {value}{hint}"
    return None


def _unknown_key_message(e: BaseException, argv: Sequence[str]) -> str:
    """config_flags raises AttributeError("'KEY'[ Did you mean ...]") for an unknown `--config.KEY`."""
    inner: object = e
    while isinstance(inner, BaseException) and inner.args:
        inner = inner.args[0]
    text = str(inner)
    key = text.split("\n")[0].strip("\"'")
    args = [a for a in argv if a.startswith("--config.") and key and key in a.split("=")[0]]
    hint = " ".join(text.split("\n")[1:]).strip()
    return (f"unknown config key {key!r} in {args[0] if args else 'a --config.KEY override'}"
            f"{'; ' + hint if hint else ''} (the keys are listed in l2t_jax/run_config.py)")


def run_absl(main: Callable[[list[str]], int], argv: Optional[list[str]] = None) -> int:
    """`absl.app.run(main, argv)`, returning main's exit status, with flag-time config errors as one line.

    Args:
      main: the tool's absl main (receives the remaining argv, returns the exit status).
      argv: the command line, program name first (default: sys.argv).
    """
    from absl import app

    argv = list(sys.argv if argv is None else argv)
    problem = config_file_problem(argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    started = False

    def wrapped(a: list[str]) -> int:
        nonlocal started
        started = True
        return main(a)

    try:
        app.run(wrapped, argv=argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (AttributeError, KeyError) as e:
        if started:
            raise
        print(f"error: {_unknown_key_message(e, argv[1:])}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the config file itself failed while the flags were parsed
        if started:
            raise
        lines = str(e).strip().splitlines()
        print(f"error: the config file could not be loaded: {type(e).__name__}"
              f"{': ' + lines[-1].strip() if lines else ''} (fix the file or pass another --config)", file=sys.stderr)
        return 2
    return 0
