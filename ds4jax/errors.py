"""The one line a user sees for an exception (the scripts' `error: ...`, LocalAI's status
messages, the model process's failure reply).

    one_line(FileNotFoundError(2, "No such file or directory", "m.gguf"))
    # -> "No such file or directory: m.gguf"
"""

from __future__ import annotations

import errno
import re

# The last line of a Python traceback: "module.Name: message".
_EXCEPTION_LINE = re.compile(r"\s*[\w.]*(?:Error|Exception): (\S.*)")


def one_line(e: BaseException) -> str:
  """The first line of e's message, without Python's decorations (a KeyError's quotes, an
  OSError's `[Errno N]`; a failed host callback's own exception line); the exception's type
  name when it has no message."""
  if isinstance(e, KeyError) and e.args:
    msg = str(e.args[0])
  elif isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
    msg = f"address already in use: {e.filename or e}"
  elif isinstance(e, OSError) and e.strerror and e.filename:
    msg = f"{e.strerror}: {e.filename}"
  else:
    msg = str(e)
  lines = msg.strip().splitlines()
  if lines and "callback error" in lines[0].lower():
    # A host callback failed inside a jitted step (e.g. expert streaming's reads): XLA's
    # message is the callback's traceback, whose last exception line says why.
    for line in reversed(lines):
      m = _EXCEPTION_LINE.fullmatch(line)
      if m:
        return m.group(1)
  return lines[0] if lines else type(e).__name__
