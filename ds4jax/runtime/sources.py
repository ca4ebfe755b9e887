"""Opening a path as a weight source: a file is a ds4 GGUF, a directory an orbax checkpoint.

    src = sources.open_source("model.gguf")          # or a checkpoint directory
    stage = runtime.load.load_stage(src, "0:3")
    cfg, fingerprint = sources.model_info(path)      # metadata / manifest only
    tok = sources.open_tokenizer(path)

The only module that knows both kinds (docs/design.md §8). `ds4jax.model` loads from a
`quant.source.TensorSource` and never imports `ds4jax.checkpoints`; `ds4jax.tokenizer` reads
GGUFs only. The callers that take a user's path (the builder, `ds4jax.build`, and the cli)
open it here. Nothing below `ds4jax` imports this module at import time.

It also holds `load_stage`, the path-taking loader re-exported as `ds4jax.load_stage`.
"""

from __future__ import annotations

import os

from ds4jax.config import LayerRange, ModelConfig


def is_checkpoint(path) -> bool:
  """True if `path` is a directory (the checkpoint kind); a file is a GGUF."""
  return os.path.isdir(os.fspath(path))


def open_source(path):
  """A `TensorSource` for `path`: `checkpoints.orbax_io.OrbaxSource` for a directory (its
  manifest is read and checked), else `gguf.source.GGUFSource` (its header is read and
  checked). One-line errors: FileNotFoundError, GGUFError, CheckpointError (ValueErrors)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    from ds4jax.checkpoints.orbax_io import OrbaxSource  # deferred: imports orbax lazily
    return OrbaxSource(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  from ds4jax.gguf.source import GGUFSource
  return GGUFSource(path)


def model_info(path) -> tuple[ModelConfig, str]:
  """(config, model fingerprint) of a GGUF file or a checkpoint directory."""
  src = open_source(path)
  return src.cfg, src.fingerprint


def open_tokenizer(path):
  """The `Tokenizer` of a GGUF, or the one a checkpoint directory saved from its GGUF."""
  if is_checkpoint(path):
    from ds4jax.checkpoints.orbax_io import tokenizer_from_checkpoint
    return tokenizer_from_checkpoint(path)
  from ds4jax.tokenizer import Tokenizer
  return Tokenizer.from_gguf(path)


def load_stage(path, layers: LayerRange | str | None = None, *, dtype=None,
               weights: str = "packed", devices=1):
  """`runtime.load.load_stage` of `open_source(path)` (same arguments)."""
  from ds4jax.runtime import load
  return load.load_stage(open_source(path), layers, dtype=dtype, weights=weights,
                         devices=devices)
