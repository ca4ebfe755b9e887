"""The concurrency study (ds4jax/bench/concurrency.py) at its smallest: the tiny model in this
process, 1 and 2 streams, a one-token prompt (no prefill shape to compile) and three decode
tokens. No timing assertions (the machine is shared): the table must have its rows and
columns, every number must be positive and finite, and the stage batcher must have seen
every decode token."""

import math

import pytest

from ds4jax.bench import concurrency

LEVELS = (1, 2)
DECODE = 3


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def study(tiny_gguf):
  from ds4jax import build
  backend = build.local_backend(tiny_gguf, ctx_size=32, prefill_chunk=8, max_sessions=max(LEVELS))
  try:
    res = concurrency.bench_levels(backend, backend.cfg.vocab_size, levels=LEVELS, prompt_len=1,
                                   decode_tokens=DECODE, warm_tokens=1)
  finally:
    backend.close()
  res.update(label="single process", stages=["all"])
  results = {
      "machine": {"cpu": "test", "cpus": 2, "loadavg_before": [0, 0, 0],
                  "loadavg_after": [0, 0, 0]},
      "model": {"preset": "tiny", "n_layers": backend.cfg.n_layers},
      "settings": {"levels": list(LEVELS), "prompt_len": 1, "decode_tokens": DECODE},
      "configs": {"single": res},
  }
  concurrency.evaluate(results)
  return results, concurrency.to_markdown(results)


def test_rounds_have_sane_numbers(study):
  results, _ = study
  levels = results["configs"]["single"]["levels"]
  assert sorted(levels) == [str(c) for c in LEVELS]
  for c, r in levels.items():
    assert r["concurrency"] == int(c)
    assert len(r["tokens_out"]) == int(c) and all(len(t) == DECODE for t in r["tokens_out"])
    for key in ("wall_s", "tok_s", "itl_ms_p50", "itl_ms_p99", "ratio_tok_s", "ratio_p99",
                "mean_rows", "ms_per_call"):
      assert _positive(r[key]), (c, key)
    assert r["itl_ms_p99"] >= r["itl_ms_p50"]
    (stage,) = r["stages"]  # one stage batcher; every decode token went through it
    assert stage["decode_rows"] == int(c) * DECODE
    assert 1 <= r["mean_rows"] <= int(c)
  assert levels["1"]["ratio_tok_s"] == 1.0 and levels["1"]["mean_rows"] == 1.0


def test_markdown_table_and_goals(study):
  results, md = study
  assert "### single process (`all`)" in md
  header = ("| concurrency | aggregate tok/s | / c=1 | p50 ITL ms | p99 ITL ms | p99 / c=1 | "
            "mean batch rows | decode ms/call |")
  assert header in md
  rows = [l for l in md.splitlines() if l.startswith("| 1 |") or l.startswith("| 2 |")]
  assert len(rows) == 2 and all(l.count("|") == 9 and "n/a" not in l for l in rows)
  assert "### Goals" in md
  names = [g["name"] for g in results["goals"]]
  # the goals are at 8 streams: n/a here, but listed
  assert any("aggregate tok/s, 8 streams" in n for n in names)
  assert any(n.endswith("(issue 21)") for n in names)  # >= 4x, its own row
  assert all(g["met"] is None for g in results["goals"])
  parity = results["parity"]
  assert list(parity) == ["single process, 2 streams: stream 0 decodes the same tokens as "
                          "1 stream"]


def test_prompts_are_per_stream_and_stable():
  a = concurrency.stream_prompts(512, 3, 8, seed=0)
  assert a == concurrency.stream_prompts(512, 3, 8, seed=0)
  assert a[:2] == concurrency.stream_prompts(512, 2, 8, seed=0)  # stream i's, whatever c
  assert len({tuple(p) for p in a}) == 3 and all(len(p) == 8 for p in a)
