"""Shared pytest fixtures. Keep this small and generic: fixtures that one package needs live
next to its tests."""

import pytest

from ds4jax.testing import tiny


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory):
  """One cache directory per test session, so fixtures are built once and never go stale."""
  return str(tmp_path_factory.mktemp("ds4jax-cache"))


@pytest.fixture(scope="session")
def tiny_gguf(tiny_cache_dir) -> str:
  """Path to the `tiny` preset GGUF (seed 0, ds4 quant mix), built once per session."""
  return tiny.tiny_gguf_path("tiny", tiny_cache_dir)


@pytest.fixture(scope="session")
def bench_gguf(tiny_cache_dir) -> str:
  """Path to the `bench` preset GGUF (about 38 MB), built once per session."""
  return tiny.tiny_gguf_path("bench", tiny_cache_dir)
