"""The one line a user sees for an exception (the scripts' `error: ...`, LocalAI's status
messages, the model process's failure reply).

    one_line(FileNotFoundError(2, "No such file or directory", "m.gguf"))
    # -> "No such file or directory: m.gguf"
"""

from __future__ import annotations

import errno


def one_line(e: BaseException) -> str:
  """The first line of e's message, without Python's decorations (a KeyError's quotes, an
  OSError's `[Errno N]`); the exception's type name when it has no message."""
  if isinstance(e, KeyError) and e.args:
    msg = str(e.args[0])
  elif isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
    msg = f"address already in use: {e.filename or e}"
  elif isinstance(e, OSError) and e.strerror and e.filename:
    msg = f"{e.strerror}: {e.filename}"
  else:
    msg = str(e)
  return msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
