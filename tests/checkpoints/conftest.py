"""Fixtures for the checkpoint tests: one orbax checkpoint of the tiny model per session, and
runners of any range restored from it (cheap: no dequantisation)."""

import functools

import pytest

from ds4jax.checkpoints import orbax_io
from ds4jax.runtime import checkpoint
from ds4jax.testing.suite import CHUNK, CTX


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_gguf, tmp_path_factory) -> str:
  out = tmp_path_factory.mktemp("ckpt") / "tiny-all"
  checkpoint.save_stage_checkpoint(tiny_gguf, "all", out)
  return str(out)


@pytest.fixture(scope="session")
def make_runner(tiny_ckpt):
  """make_runner("A:B", ctx=...) -> a StageRunner (with the model fingerprint), cached."""
  from ds4jax.runtime.runner import StageRunner

  fp = orbax_io.read_manifest(tiny_ckpt)["fingerprint"]

  @functools.lru_cache(maxsize=None)
  def cached(layers: str, ctx: int, max_chunk: int):
    stage = checkpoint.load_stage_checkpoint(tiny_ckpt, layers)
    return StageRunner(stage, ctx_size=ctx, max_chunk=max_chunk, fingerprint=fp)

  def make(layers: str, ctx: int = CTX, max_chunk: int = CHUNK):
    return cached(layers, ctx, max_chunk)  # one key however it is called: compile once

  return make
