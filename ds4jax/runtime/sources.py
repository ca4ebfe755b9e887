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


# The built-in models a bare name means: `docs` ships in ds4jax/data/; `tiny` and `bench` are
# random test models built once into the cache directory.
BUILT_IN = ("docs", "tiny", "bench")


def resolve(spec, cache_dir: str | None = None) -> str:
  """The path a user's model spec names: a GGUF file, an orbax checkpoint directory, or a
  built-in model name (`BUILT_IN`), as the scripts' --gguf and `ds4jax.load_model` take it.

  A path with a separator (`./docs`, `/m/docs`) is always a path. A bare built-in name is
  the built-in model, unless a model (a file, or a checkpoint directory) of that name is
  in the working directory too: that is ambiguous and an error (a directory that is no
  model, like a repository's docs/, is not). One-line errors otherwise."""
  spec = os.fspath(spec)
  if spec in BUILT_IN:
    here = os.path.isfile(spec) or os.path.isfile(os.path.join(spec, "ds4jax_checkpoint.json"))
    if here:
      raise ValueError(f"{spec!r} names both the built-in {spec} model and the model at "
                       f"./{spec}: write ./{spec} for the path")
    if spec == "docs":
      from ds4jax.data import docs_gguf_path
      return docs_gguf_path()
    from ds4jax.gguf import tiny  # deferred: only needed for the test models
    return tiny.tiny_gguf_path(spec, cache_dir)
  if os.path.isdir(spec):
    open_source(spec)  # reads the manifest: a one-line error if it is not a checkpoint
    return spec
  if not os.path.exists(spec):
    raise FileNotFoundError(f"GGUF file not found: {spec} (or a built-in model: "
                            f"{', '.join(BUILT_IN)})")
  if not os.path.isfile(spec):
    raise ValueError(f"{spec} is not a file")
  return spec


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
  """(config, model fingerprint) of a GGUF file, a checkpoint directory or a built-in name."""
  src = open_source(resolve(path))
  return src.cfg, src.fingerprint


def open_tokenizer(path):
  """The `Tokenizer` of a GGUF, or the one a checkpoint directory saved from its GGUF."""
  path = resolve(path)
  if is_checkpoint(path):
    from ds4jax.checkpoints.orbax_io import tokenizer_from_checkpoint
    return tokenizer_from_checkpoint(path)
  from ds4jax.gguf.lean import LeanReader
  from ds4jax.tokenizer import Tokenizer
  return Tokenizer.from_gguf(path, open_reader=LeanReader)


def load_stage(path, layers: LayerRange | str | None = None, *, dtype=None,
               weights: str = "packed", devices=1):
  """`runtime.load.load_stage` of `open_source(path)` (same arguments)."""
  from ds4jax.runtime import load
  return load.load_stage(open_source(path), layers, dtype=dtype, weights=weights,
                         devices=devices)
