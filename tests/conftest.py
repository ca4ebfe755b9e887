"""Shared pytest fixtures. Keep this small and generic: fixtures that one package needs live
next to its tests.

The suite's cache (the tiny GGUFs and XLA's persistent compilation cache) lives in
`$DS4JAX_CACHE/jax-<version>` (default `~/.cache/ds4jax/jax-<version>`) and outlives the run:
a second run loads every executable instead of compiling it. The fixtures are keyed by the code
that builds them and XLA's entries by the program, so nothing goes stale. This process and
every child it starts (scripts, workers, notebooks: they inherit `DS4JAX_CACHE` and
`JAX_COMPILATION_CACHE_DIR`) share it. Point `DS4JAX_CACHE` at an empty directory for a cold
run.
"""

import os
import pathlib

import jax
import pytest

from ds4jax import cli
from ds4jax.testing import tiny
from ds4jax.testing.suite import CHUNK, CTX


def _suite_cache() -> str:
  base = pathlib.Path(os.environ.get("DS4JAX_CACHE") or pathlib.Path.home() / ".cache" /
                      "ds4jax")
  leaf = f"jax-{jax.__version__}"
  d = base if base.name == leaf else base / leaf  # a nested pytest inherits the keyed dir
  d.mkdir(parents=True, exist_ok=True)
  return str(d)


SUITE_CACHE = _suite_cache()
os.environ["DS4JAX_CACHE"] = SUITE_CACHE  # children find the fixtures and the XLA cache here
cli.enable_compilation_cache(SUITE_CACHE)


def pytest_report_header(config):
  return f"ds4jax suite cache: {SUITE_CACHE}"


@pytest.fixture(scope="session")
def tiny_cache_dir() -> str:
  """The suite's cache directory (see the module doc): fixtures are built once, ever."""
  return SUITE_CACHE


@pytest.fixture(scope="session")
def tiny_gguf(tiny_cache_dir) -> str:
  """Path to the `tiny` preset GGUF (seed 0, ds4 quant mix), built once."""
  return tiny.tiny_gguf_path("tiny", tiny_cache_dir)


@pytest.fixture(scope="session")
def bench_gguf(tiny_cache_dir) -> str:
  """Path to the `bench` preset GGUF (about 38 MB), built once."""
  return tiny.tiny_gguf_path("bench", tiny_cache_dir)


@pytest.fixture(scope="session")
def split_route(tiny_gguf, tmp_path_factory):
  """The session's split route (ds4jax.testing.cluster.SharedRoute): one worker process for
  layers 2:output dialing `split_route.listen`. A front end under test listens there with
  --layers=0:1, --ctx_size=CTX (or less), no key and no TLS."""
  from ds4jax.testing.cluster import SharedRoute
  route = SharedRoute(tiny_gguf, layers="0:1", ranges=("2:output",), ctx_size=CTX,
                      cache_dir=SUITE_CACHE, log_dir=str(tmp_path_factory.mktemp("split-route")))
  route.start()
  yield route
  route.stop()


@pytest.fixture(scope="session")
def tiny_reference(tiny_gguf):
  """reference(prompt, max_new_tokens, chat=..., sampling=...) -> the whole tiny model's
  GenerationResult (greedy unless `sampling`), in this process at the standard shapes,
  memoised: what a front end on a split must return. That a split equals one process is
  tests/bridge/e2e_test.py's proof."""
  from ds4jax import build
  from ds4jax.generate.loop import Generator
  from ds4jax.tokenizer import Tokenizer
  backend = build.local_backend(tiny_gguf, ctx_size=CTX, prefill_chunk=CHUNK)
  gen = Generator(backend, Tokenizer.from_gguf(tiny_gguf))
  memo = {}

  def reference(prompt=None, max_new_tokens=8, *, chat=False, prompt_tokens=None,
                sampling=None):
    key = (prompt, max_new_tokens, chat, tuple(prompt_tokens or ()), sampling)
    if key not in memo:
      memo[key] = gen.generate(prompt, prompt_tokens=prompt_tokens, sampling=sampling,
                               max_new_tokens=max_new_tokens, chat=chat)
    return memo[key]

  reference.generator = gen  # for chats (gen.chat()) and other uses of the same model
  yield reference
  backend.close()


# The files that take longest (a cold run on this 2-core machine: the notebooks, the routes
# of real processes, the bench smoke), first: the suite's two test processes (scripts/test.sh,
# pytest-xdist, a file at a time) then end together instead of one of them running a long
# file alone at the end.
_LONGEST_FIRST = ("notebook_test.py", "notebook_docs_test.py", "notebook_inside_test.py",
                  "capture_route_test.py", "edits_test.py", "bench_smoke_test.py",
                  "e2e_test.py", "scripts_test.py", "train_test.py", "local_batching_test.py",
                  "sharding_test.py", "capture_script_test.py", "builders_test.py",
                  "streaming_test.py", "research_server_test.py", "generate_session_test.py",
                  "kv_disk_test.py", "kv_disk_script_test.py", "batch_test.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: k for k, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: file order kept
