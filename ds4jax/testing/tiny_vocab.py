"""The tests' name for `ds4jax.tokenizer.tiny_vocab`, the tiny models' vocabulary (production
code: every GGUF written without a tokenizer gets it). This module IS that one."""

import sys

from ds4jax.tokenizer import tiny_vocab as _tiny_vocab

sys.modules[__name__] = _tiny_vocab
