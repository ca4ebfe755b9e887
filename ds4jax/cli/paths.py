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

PRESETS = ("tiny", "bench")  # the random test models; `docs` is the shipped trained one


def resolve_gguf(spec: str | None, cache_dir: str | None = None) -> str:
  """A --gguf value as a path (`runtime.sources.resolve`: a GGUF file, a checkpoint
  directory, or a built-in model name built into the cache); one-line errors otherwise."""
  if not spec:
    raise ValueError("--gguf is required (a GGUF path, 'docs' for the shipped trained model, "
                     "or 'tiny'/'bench' for a random test model)")
  from ds4jax.runtime import sources  # deferred: a script's --help imports no JAX
  return sources.resolve(spec, cache_dir)


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
