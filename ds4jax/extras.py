"""One-line errors for missing optional extras (pyproject's serve, localai, reference).

    uvicorn = extras.need("serve", "uvicorn", "scripts/serve.py")
    # without it: MissingExtra("scripts/serve.py needs the 'serve' extra: pip install
    #                           'ds4jax[serve]' (no module named 'uvicorn')")

`cli.run` prints a MissingExtra as `error: <message>` (exit 2), like any bad input.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# What each extra brings, for messages and for `check`.
EXTRAS = {
    "serve": ("fastapi", "uvicorn"),
    "localai": ("grpc", "google.protobuf"),
    "reference": ("torch", "transformers"),
}


class MissingExtra(ImportError):
  """An optional dependency is not installed; the message says what to install."""


def need(extra: str, module: str, what: str) -> ModuleType:
  """Imports `module` (part of `extra`), or raises MissingExtra naming the pip command."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    missing = getattr(e, "name", None) or module
    raise MissingExtra(f"{what} needs the '{extra}' extra: pip install 'ds4jax[{extra}]' "
                       f"(no module named {missing!r})") from None


def check(extra: str, what: str) -> None:
  """Imports every module of `extra`; MissingExtra for the first one missing."""
  for module in EXTRAS[extra]:
    need(extra, module, what)
