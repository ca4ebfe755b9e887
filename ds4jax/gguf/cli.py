"""Script plumbing: run an absl main so that bad input prints one line and no traceback."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from absl import app, flags

# Errors that mean "bad input" rather than "bug": they become one line on stderr, exit 2.
INPUT_ERRORS = (ValueError, OSError, KeyError)


def _fail(msg: str) -> None:
  print(f"error: {msg.splitlines()[0] if msg else 'failed'}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad or missing flag reported on one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))


def run(main: Callable[[list[str]], int | None]) -> None:
  """`app.run(main)`, with input errors reported as `error: <message>` and exit status 2."""

  def wrapped(argv):
    # gguf-py logs every file it writes at INFO; keep script output to what we print.
    logging.getLogger("gguf").setLevel(logging.WARNING)
    try:
      return main(argv)
    except INPUT_ERRORS as e:
      _fail(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e) or type(e).__name__)

  app.run(wrapped, flags_parser=_parse_flags)
