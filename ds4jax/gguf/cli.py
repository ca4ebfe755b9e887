"""Script plumbing: run an absl main so that bad input prints one line and no traceback."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from absl import app

# Errors that mean "bad input" rather than "bug": they become one line on stderr, exit 2.
INPUT_ERRORS = (ValueError, OSError, KeyError)


def run(main: Callable[[list[str]], int | None]) -> None:
  """`app.run(main)`, with input errors reported as `error: <message>` and exit status 2."""

  def wrapped(argv):
    # gguf-py logs every file it writes at INFO; keep script output to what we print.
    logging.getLogger("gguf").setLevel(logging.WARNING)
    try:
      return main(argv)
    except INPUT_ERRORS as e:
      msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
      print(f"error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
      sys.exit(2)

  app.run(wrapped)
