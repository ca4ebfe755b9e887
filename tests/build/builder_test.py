"""ds4jax.build, the one builder (issue 20 items 3 and 8): every stage compiles the shapes it
serves before its weights load, and runs each once, so a built backend traces nothing when it
serves any batch of up to max_sessions sessions and any prompt."""

import numpy as np

from ds4jax import build
from ds4jax.runtime.local import StepRequest
from ds4jax.runtime.sampling import SamplingParams


def test_serving_shapes_are_the_decode_buckets_then_the_chunk_buckets(tiny_gguf):
  r = build.load_runner(tiny_gguf, "all", ctx_size=64, prefill_chunk=8, max_sessions=3)
  assert r.serving_shapes(8, 3) == [(1, 1), (2, 1), (4, 1), (1, 2), (1, 8)]
  assert r.serving_shapes(256, 1) == [(1, 1), (1, 4), (1, 16), (1, 64)]  # capped at ctx 64
  assert r.max_chunk == 256 and build.max_chunk_for(300) == 512


def test_a_one_shot_prompt_compiles_only_the_rungs_it_runs():
  """generate.py's chunk for a prompt it knows (`prefill_chunk_for`): the lowest rung of the
  ladder that holds the prompt, whose own ladder is the rungs below, so the prompt runs at
  the same shape and the same chunking as with the full ladder."""
  from ds4jax.runtime.runner import prefill_chunk_for
  assert [prefill_chunk_for(n, 256) for n in (1, 4, 5, 16, 17, 64, 65, 256, 300)] == [
      1, 4, 16, 16, 64, 64, 256, 256, 256]
  assert prefill_chunk_for(50, 100) == 100 and prefill_chunk_for(7, 100) == 8
  assert prefill_chunk_for(3, 16) == 4 and prefill_chunk_for(20, 16) == 16


def test_a_built_backend_traces_nothing_while_it_serves(tiny_gguf):
  be = build.local_backend(tiny_gguf, ranges=("0:1", "2:output"), ctx_size=64,
                           prefill_chunk=8, max_sessions=2)
  traces = [r.n_traces for r in be.runners]
  greedy = SamplingParams()
  try:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, be.cfg.vocab_size, n).tolist() for n in (1, 3, 8, 13)]
    for p in prompts:  # every chunk bucket, one session at a time
      sid = be.new_session()
      be.step(sid, p, greedy, 0)
      be.close_session(sid)
    sids = [be.new_session() for _ in range(2)]
    transcripts = [list(prompts[1]), list(prompts[2])]
    for k in range(3):  # two sessions decoding at once (batched when their steps meet)
      res = be.step_many([StepRequest(s, t, greedy, k) for s, t in zip(sids, transcripts)])
      for t, r in zip(transcripts, res):
        t.append(r.token)
    for r in be.runners:  # the two-row decode bucket, whatever the timing above did
      hc = None if r.embeds else np.zeros((2, 1, r.cfg.n_hc, r.cfg.d_model), np.float32)
      r.forward_batch(r.init_pool(2), [0, 1], [[5], [7]], hc, [1, 1])
  finally:
    be.close()
  assert [r.n_traces for r in be.runners] == traces


def test_a_worker_loads_while_it_dials_then_serves_the_coordinators_chunk(tiny_gguf):
  """Issue 24 item 4: the slice loads and compiles before any coordinator answers (a route
  forms in max(load, connect)); ACCEPT's prefill chunk (8) becomes the worker's ladder."""
  import threading
  import time

  from ds4jax.bridge.worker.worker import WorkerOptions
  from ds4jax.local_cluster import free_port
  port = free_port("127.0.0.1")
  w = build.worker(tiny_gguf, "2:output", ("127.0.0.1", port),
                   options=WorkerOptions(ctx=64, max_sessions=2, backoff_max=0.2))
  t = threading.Thread(target=w.run, daemon=True)
  t.start()
  coord = None
  try:
    deadline = time.monotonic() + 120
    while not w.loaded:
      assert time.monotonic() < deadline, "the slice never loaded"
      time.sleep(0.05)
    assert w.connections == 0  # loaded and compiled, and no coordinator has answered yet
    coord = build.coordinator(tiny_gguf, layers="0:1", listen=f"127.0.0.1:{port}",
                              ctx_size=64, prefill_chunk=8, max_sessions=2)
    coord.wait_route(60)
    assert set(w.runner.compiled_shapes(2)) == set(w.runner.serving_shapes(8, 2))
    sid = coord.new_session()
    assert coord.step(sid, [1, 5, 7], SamplingParams(), 0).token >= 0
  finally:
    w.stop()
    if coord is not None:
      coord.close()
    t.join(30)
