"""PredictOptions -> prompt ids, sampling and a GenerationJob (no gRPC, no model process)."""

import types

import pytest

from ds4jax.localai import predict
from ds4jax.localai.predict import RequestError, build_job, prompt_ids
from ds4jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_gguf):
  return Tokenizer.from_gguf(tiny_gguf)


def msg(role, content):
  return types.SimpleNamespace(role=role, content=content)


def req(prompt="", messages=(), template=False, tokens=0, temperature=0.0, top_p=0.0, top_k=0,
        seed=0, stop=(), metadata=None):
  return types.SimpleNamespace(Prompt=prompt, Messages=list(messages),
                               UseTokenizerTemplate=template, Tokens=tokens,
                               Temperature=temperature, TopP=top_p, TopK=top_k, Seed=seed,
                               StopPrompts=list(stop), Metadata=metadata or {}, MinP=0.0)


def test_prompt_is_bos_plus_text(tok):
  assert prompt_ids(req("Hello"), tok) == tok.encode("Hello", add_bos=True)
  assert prompt_ids(req(), tok, allow_empty=True) == []
  with pytest.raises(RequestError, match="Prompt or .Messages must be set"):
    prompt_ids(req(), tok)


def test_messages_use_the_ds4_chat_format(tok):
  msgs = [msg("system", "Be brief."), msg("developer", "Really."), msg("user", "Hi"),
          msg("assistant", "Hello"), msg("user", "Again")]
  want = tok.chat_prompt([("system", "Be brief.\n\nReally."), ("user", "Hi"),
                          ("assistant", "Hello"), ("user", "Again")])
  assert prompt_ids(req("rendered by LocalAI", msgs, template=True), tok) == want
  # Without the template flag a rendered Prompt wins; with no Prompt the messages are used.
  assert prompt_ids(req("rendered", msgs), tok) == tok.encode("rendered", add_bos=True)
  assert prompt_ids(req("", msgs), tok) == want
  thinking = prompt_ids(req("", [msg("user", "Hi")], metadata={"enable_thinking": "true"}), tok)
  assert thinking == tok.chat_prompt([("user", "Hi")], thinking=True)


def test_bad_messages(tok):
  with pytest.raises(RequestError, match="unknown chat role 'robot'"):
    prompt_ids(req("", [msg("robot", "x")]), tok)
  with pytest.raises(RequestError, match="system message must come before"):
    prompt_ids(req("", [msg("user", "x"), msg("system", "y")]), tok)


def test_job_defaults_and_caps(tok):
  job, n = build_job(req("Hello", stop=["\n", ""]), tok, ctx_size=4096)
  assert n == len(tok.encode("Hello", add_bos=True)) and job.prompt == tok.encode("Hello",
                                                                                  add_bos=True)
  assert job.max_tokens == 256 and job.stop == ("\n",) and job.messages is None
  s = job.sampling
  assert (s.temperature, s.top_k, s.top_p, s.seed) == (0.0, 0, 1.0, 0)
  job, n = build_job(req("Hello", tokens=100), tok, ctx_size=n + 10)
  assert job.max_tokens == 10  # what the context still holds
  with pytest.raises(RequestError, match="the context holds 2"):
    build_job(req("Hello world, how are you"), tok, ctx_size=2)


def test_sampling_fields():
  s = predict.sampling(req(temperature=0.7, top_p=0.9, top_k=40, seed=42))
  assert (s.temperature, s.top_k, s.seed) == (pytest.approx(0.7), 40, 42)
  assert s.top_p == pytest.approx(0.9)
  assert 0 <= predict.sampling(req(seed=-1)).seed < 2**31
  assert predict.sampling(req(top_p=1.5)).top_p == 1.0
