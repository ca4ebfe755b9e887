"""The tests' name for `ds4jax.gguf.tiny`, the random tiny models (they are production code:
`--gguf=tiny`, `scripts/make_tiny_gguf.py`). This module IS that one, so a monkeypatch here
patches the real module."""

import sys

from ds4jax.gguf import tiny as _tiny

sys.modules[__name__] = _tiny
