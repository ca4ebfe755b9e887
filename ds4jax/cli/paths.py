"""Where a script's files are: the `--gguf` value as a path (a file, a checkpoint directory or
a built-in model name), the cache directory, and the persistent XLA compilation cache.

`--gguf=tiny` (or `bench`) names the built-in test model, built once into the cache directory
(`--cache_dir`, else `$DS4JAX_CACHE`, else ~/.cache/ds4jax); `--gguf=docs` the small trained
model that ships in `ds4jax/data/`.
"""

from __future__ import annotations

import importlib.metadata
import os

from ds4jax.data import cache_root

PRESETS = ("tiny", "bench")


def resolve_gguf(spec: str | None, cache_dir: str | None = None) -> str:
  """A GGUF path, or a preset name built into the cache; one-line errors otherwise."""
  if not spec:
    raise ValueError("--gguf is required (a GGUF path, or 'tiny' for the built-in test model)")
  named = spec in PRESETS or spec == "docs"
  # A model name wins over a directory that is not a checkpoint (the repo's own docs/).
  if os.path.exists(spec) and not (named and os.path.isdir(spec) and not os.path.isfile(
      os.path.join(spec, "ds4jax_checkpoint.json"))):
    if os.path.isdir(spec):  # an orbax checkpoint (scripts/convert_to_orbax.py)
      from ds4jax.runtime import sources
      sources.open_source(spec)  # reads the manifest: a one-line error if it is not one
      return spec
    if not os.path.isfile(spec):
      raise ValueError(f"--gguf={spec} is not a file")
    return spec
  if spec == "docs":
    from ds4jax.data import docs_gguf_path
    return docs_gguf_path()
  if spec in PRESETS:
    from ds4jax.gguf import tiny  # deferred: only needed for the test models
    return tiny.tiny_gguf_path(spec, cache_dir)
  raise FileNotFoundError(f"GGUF file not found: {spec}")


def compilation_cache_dir(cache_dir: str | None = None) -> str:
  """The persistent compilation cache under the cache dir, one per jax and jaxlib version
  (an upgrade starts a fresh one instead of probing the old one's entries)."""
  versions = "-".join(f"{p}{importlib.metadata.version(p)}" for p in ("jax", "jaxlib"))
  return str(cache_root(cache_dir) / "xla" / versions)


def compilation_cache_env(cache_dir: str | None = None) -> str:
  """Points JAX's persistent compilation cache at the cache dir via the environment, so this
  process (before JAX starts) and every child process (workers) share it."""
  d = compilation_cache_dir(cache_dir)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = d
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return d


def enable_compilation_cache(cache_dir: str | None = None) -> str:
  """Persists XLA compilations under the cache dir, so a restart loads every shape a stage
  serves instead of compiling it (the shapes still trace and lower: seconds, not minutes)."""
  import jax
  d = compilation_cache_env(cache_dir)
  jax.config.update("jax_compilation_cache_dir", d)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return d
