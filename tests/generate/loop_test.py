"""Generator: streaming equals non-streaming, UTF-8 across tokens, stop conditions, chat."""

import numpy as np
import pytest

from ds4jax.config import LayerRange
from ds4jax.runtime.local import LocalBackend
from ds4jax.generate.loop import Generator
from ds4jax.runtime.sampling import SamplingParams, TopK, TopP

from generate_fakes import PrefixRunner, ScriptBackend


def _ids(tok, text):
  return tok.encode(text)


def test_prompt_formats(tiny_tokenizer):
  tok = tiny_tokenizer
  gen = Generator(ScriptBackend([5]), tok)
  assert gen.prompt_ids("hi") == [tok.bos_id] + tok.encode("hi")
  assert gen.prompt_ids(prompt_tokens=[3, 4]) == [3, 4]
  want = tok.chat_prompt([("system", "s"), ("user", "hi")])
  assert gen.prompt_ids("hi", chat=True, system="s") == want
  with pytest.raises(ValueError, match="exactly one"):
    gen.prompt_ids("a", [1])


def test_prompt_is_the_tokenizers_prompt(tiny_tokenizer):
  """Issue 24 item 11: the notebook path (Tokenizer.prompt) is what generation feeds."""
  tok = tiny_tokenizer
  gen = Generator(ScriptBackend([5]), tok)
  assert gen.prompt_ids("hi") == tok.prompt("hi")
  assert gen.prompt_ids("hi", chat=True, system="s") == tok.prompt("hi", chat=True, system="s")


def test_the_context_bounds_the_prompt_up_front_and_ends_generation_at_length(tiny_tokenizer):
  """Issue 24 item 2: a prompt longer than the context is a one-line error before any step;
  a generation that fills the context stops with finish_reason 'length', not an error."""
  backend = ScriptBackend([5] * 20, ctx_size=8)
  gen = Generator(backend, tiny_tokenizer)
  with pytest.raises(ValueError, match="the prompt has 9 tokens, more than the context size 8"):
    gen.generate(prompt_tokens=list(range(9)), max_new_tokens=4)
  assert backend.seen == []
  res = gen.generate(prompt_tokens=[1, 2, 3, 4, 5], max_new_tokens=10)
  assert len(res.tokens) == 4 and res.finish_reason == "length"  # 5 + 3 fed back = 8
  assert max(len(t) for t in backend.seen) == 8
  res = gen.generate(prompt_tokens=list(range(8)), max_new_tokens=10)
  assert len(res.tokens) == 1 and res.finish_reason == "length"


def test_utf8_split_across_tokens_streams_whole_characters(tiny_tokenizer):
  tok = tiny_tokenizer
  text = "café 🙂 世界!"
  script = [8 + b for b in text.encode("utf-8")]  # one byte token per byte
  gen = Generator(ScriptBackend(script + [tok.eos_id]), tok)
  pieces = list(gen.stream("x", max_new_tokens=100))
  assert "".join(pieces) == text
  assert all("\ufffd" not in p for p in pieces)
  assert "🙂" in pieces and "世" in pieces
  res = gen.generate("x", max_new_tokens=100)
  assert res.text == text and res.finish_reason == "eos"
  assert res.tokens == script + [tok.eos_id]


def test_stop_string_cut_and_held_back(tiny_tokenizer):
  tok = tiny_tokenizer
  script = [8 + b for b in b"hello world, more"]
  gen = Generator(ScriptBackend(script), tok)
  stream = gen.stream("x", max_new_tokens=50, stop=["wor", "zzz"])
  pieces = list(stream)
  assert "".join(pieces) == "hello " == stream.result.text
  assert stream.result.finish_reason == "stop"
  assert all("w" not in p for p in pieces)  # "w" was held back as a possible stop prefix
  assert stream.result.tokens == script[:9]  # up to the 'r' that completed "wor"


def test_stop_token_and_length(tiny_tokenizer):
  tok = tiny_tokenizer
  script = [8 + ord("a"), 8 + ord("b"), 3, 8 + ord("c")]
  gen = Generator(ScriptBackend(script), tok)
  res = gen.generate("x", max_new_tokens=10, stop_tokens=[3])
  assert (res.text, res.finish_reason, res.tokens) == ("ab", "stop", script[:3])
  res = gen.generate("x", max_new_tokens=2)
  assert (res.text, res.finish_reason) == ("ab", "length")
  assert res.timings["decode_tokens"] == 1


def test_transcript_grows_by_sampled_tokens(tiny_tokenizer):
  tok = tiny_tokenizer
  backend = ScriptBackend([20, 21, 22])
  res = Generator(backend, tok).generate(prompt_tokens=[0, 9], max_new_tokens=3)
  assert backend.seen == [[0, 9], [0, 9, 20], [0, 9, 20, 21]]
  assert not backend.open  # the one-shot session was closed
  assert len(res.telemetry) == 3 and res.hop_summary()[0]["decode_steps"] == 2


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.5, seed=7),
                                      TopK(k=50, temperature=2.0, seed=1), TopP(p=0.95, seed=2)])
def test_streamed_equals_non_streamed_on_a_model(tiny_tokenizer, sampling):
  tok = tiny_tokenizer
  backend = LocalBackend(PrefixRunner(LayerRange.parse("all", 4), ctx_size=128))
  gen = Generator(backend, tok)
  kw = dict(max_new_tokens=40, sampling=sampling, stop=["the"])
  res = gen.generate("Hello, world", **kw)
  stream = gen.stream("Hello, world", **kw)
  assert "".join(stream) == res.text == stream.result.text
  assert stream.result.tokens == res.tokens
  if res.finish_reason == "length":
    assert res.text == tok.decode(res.tokens)


def test_chat_session_reuses_the_kv_prefix(tiny_tokenizer):
  tok = tiny_tokenizer
  backend = LocalBackend(PrefixRunner(LayerRange.parse("all", 4), ctx_size=128))
  chat = Generator(backend, tok).chat(system="Be brief.")
  r1 = chat.send("Hi there", max_new_tokens=5)
  first_prompt = r1.prompt_tokens
  assert r1.n_prefill_computed == len(first_prompt)
  held = len(first_prompt) + len(r1.tokens) - 1  # the last sampled token never ran
  r2 = chat.send("And then?", max_new_tokens=5)
  assert r2.prompt_tokens[:len(first_prompt)] == first_prompt
  assert r2.n_prefill_computed == len(r2.prompt_tokens) - held
  assert r2.n_prefill_computed < len(r2.prompt_tokens) // 2 + 5
  assert tok.decode(r2.prompt_tokens).endswith("<｜User｜>And then?<｜Assistant｜></think>")
  # The second turn's logits equal a fresh one-shot run on the same transcript.
  fresh = Generator(backend, tok).generate(prompt_tokens=r2.prompt_tokens, max_new_tokens=5)
  assert fresh.tokens == r2.tokens


def test_bad_arguments_fail_at_the_call(tiny_tokenizer):
  gen = Generator(ScriptBackend([5]), tiny_tokenizer)
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.stream("x", max_new_tokens=0)
  with pytest.raises(ValueError, match="non-empty"):
    gen.stream("x", stop=[""])
  # A single stop string is accepted as a string.
  script = [8 + b for b in b"abc"]
  res = Generator(ScriptBackend(script), tiny_tokenizer).generate("x", max_new_tokens=3, stop="b")
  assert res.text == "a" and res.finish_reason == "stop"


def test_slow_prefill_logs_progress(tiny_tokenizer, caplog):
  import logging
  import time

  def n_lines():
    return sum("prefilling 3 prompt tokens" in r.message for r in caplog.records)

  at_decode = []

  class Slow(ScriptBackend):
    def step(self, sid, transcript, *a, **kw):
      if len(transcript) == 3:  # the prefill: slow until progress has been logged
        deadline = time.monotonic() + 60  # a hang guard: the first line comes after 0.1 s
        while not n_lines():
          assert time.monotonic() < deadline, "no progress line during a slow prefill"
          time.sleep(0.01)
      else:
        at_decode.append(n_lines())
        time.sleep(0.25)  # a slow decode step: no prefill progress may be logged now
      return super().step(sid, transcript, *a, **kw)

  gen = Generator(Slow([8 + 97, 8 + 98]), tiny_tokenizer)
  gen.progress_every_s = 0.1
  with caplog.at_level(logging.INFO, logger="ds4jax.generate"):
    gen.generate(prompt_tokens=[0, 5, 6], max_new_tokens=2)
  assert at_decode and at_decode[0] >= 1  # logged during the prefill step ...
  assert n_lines() == at_decode[0]  # ... and only then
