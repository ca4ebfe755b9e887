"""The worker session store: prefix check before compute, rewind, LRU eviction, over the
slots of a StageBatcher pool."""

import pytest

from ds4jax.wire import protocol
from ds4jax.wire.errors import PrefixMismatch
from ds4jax.bridge.worker.sessions import SessionStore
from ds4jax.config import LayerRange
from ds4jax.runtime.batching import StageBatcher
from ds4jax.testing.fake_stage import FakeConfig, FakeRunner

INIT = protocol.FNV_INIT


@pytest.fixture
def store(request):
  limit, ctx = request.param
  runner = FakeRunner(FakeConfig(), LayerRange(0, 3, True), ctx)
  batcher = StageBatcher(runner, n_slots=limit)
  yield SessionStore(limit, batcher), runner
  batcher.close()


def _run(st, sid, pos0, toks, hash_before):
  s, evicted = st.prepare(sid, pos0, hash_before)
  out = st.batcher.run(s.slot, toks, None, pos0)
  st.commit(s, toks)
  return out, evicted


@pytest.mark.parametrize("store", [(4, 32)], indirect=True)
def test_prefix_checked_and_rewind(store):
  st, runner = store
  a, _ = _run(st, "s", 0, [1, 2, 3, 4], INIT)
  with pytest.raises(PrefixMismatch, match="holds 4 positions"):
    st.prepare("s", 5, INIT)
  with pytest.raises(PrefixMismatch, match="prefix hash at position 2"):
    st.prepare("s", 2, protocol.fnv1a64([1, 9]))
  with pytest.raises(PrefixMismatch, match="unknown here"):
    st.prepare("other", 3, protocol.fnv1a64([1, 2, 3]))
  # Rewind to 2 and diverge: same logits as computing [1, 2, 7, 8] from scratch.
  b, _ = _run(st, "s", 2, [7, 8], protocol.fnv1a64([1, 2]))
  ref, _ = runner.forward(runner.init_state(), [1, 2, 7, 8], None, 0)
  assert (b == ref[2:]).all() and not (b == a[2:]).all()
  assert st.batcher.n_free == 3 and not st.get("s").busy


@pytest.mark.parametrize("store", [(2, 8)], indirect=True)
def test_lru_eviction_frees_the_slot_and_skips_busy_sessions(store):
  st, _ = store
  _run(st, "a", 0, [1], INIT)
  _run(st, "b", 0, [1], INIT)
  _run(st, "a", 1, [2], protocol.fnv1a64([1]))  # touch a: b is now least recent
  _, evicted = _run(st, "c", 0, [1], INIT)
  assert evicted == ["b"] and "a" in st and "b" not in st and len(st) == 2
  assert st.batcher.n_free == 0
  busy, _ = st.prepare("a", 2, protocol.fnv1a64([1, 2]))  # a computes: c is evicted instead
  s, evicted = st.prepare("d", 0, INIT)
  assert evicted == ["c"] and busy.busy
  st.release(busy)
  st.release(s)
  assert st.drop("a") and st.batcher.n_free == 1
