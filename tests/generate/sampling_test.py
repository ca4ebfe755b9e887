"""Sampling: deterministic per (seed, step), filters keep the right ids, draws follow softmax."""

import numpy as np
import pytest

from ds4jax.runtime import sampling as s


def test_greedy_ties_to_lowest_id():
  logits = np.array([1.0, 3.0, 3.0, -1.0], np.float32)
  assert s.sample_token(logits, s.SamplingParams(), 0) == 1
  assert s.Greedy().get_next_token(logits, 5) == 1


def test_deterministic_per_seed_and_step():
  logits = np.random.default_rng(0).standard_normal(100)
  p = s.SamplingParams(temperature=1.0, seed=42)
  draws = [s.sample_token(logits, p, k) for k in range(50)]
  assert draws == [s.sample_token(logits, p, k) for k in range(50)]
  assert len(set(draws)) > 10  # steps use different draws
  other = [s.sample_token(logits, s.SamplingParams(temperature=1.0, seed=43), k) for k in range(50)]
  assert draws != other


def test_top_k_and_top_p_restrict_the_support():
  logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
  topk = {s.sample_token(logits, s.SamplingParams(temperature=1.0, top_k=2, seed=1), k)
          for k in range(300)}
  assert topk == {0, 1}
  # Cumulative 0.5, 0.7, 0.85: top_p=0.8 keeps the three most likely.
  topp = {s.sample_token(logits, s.SamplingParams(temperature=1.0, top_p=0.8, seed=1), k)
          for k in range(500)}
  assert topp == {0, 1, 2}


def test_draws_follow_the_softmax():
  probs = np.array([0.6, 0.3, 0.1])
  p = s.SamplingParams(temperature=1.0, seed=7)
  n = 4000
  counts = np.bincount([s.sample_token(np.log(probs), p, k) for k in range(n)], minlength=3)
  # Three standard errors of a binomial proportion.
  assert np.all(np.abs(counts / n - probs) < 3 * np.sqrt(probs * (1 - probs) / n))
  # Temperature 0.5 sharpens: p ~ probs**2.
  sharp = probs**2 / (probs**2).sum()
  counts = np.bincount([s.sample_token(np.log(probs), s.SamplingParams(temperature=0.5, seed=7), k)
                        for k in range(n)], minlength=3)
  assert np.all(np.abs(counts / n - sharp) < 3 * np.sqrt(sharp * (1 - sharp) / n))


def test_method_dataclasses_map_to_params():
  assert s.TopK(k=5, temperature=0.7, seed=3).to_params() == s.SamplingParams(
      temperature=0.7, top_k=5, seed=3)
  assert s.TopP(p=0.9, seed=2).to_params().top_p == 0.9
  assert s.Temperature(temperature=2.0).to_params().temperature == 2.0
  p = s.SamplingParams(temperature=0.3, top_k=4, top_p=0.5, seed=9)
  assert s.SamplingParams.from_dict(p.to_dict()) == p
  with pytest.raises(ValueError, match="unknown sampling fields"):
    s.SamplingParams.from_dict({"temp": 1})


@pytest.mark.parametrize("kw,msg", [(dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"),
                                    (dict(top_p=0.0), "top_p"), (dict(seed=-1), "seed")])
def test_validation(kw, msg):
  with pytest.raises(ValueError, match=msg):
    s.SamplingParams(**kw)


def test_top_logprobs():
  logits = np.array([0.0, 2.0, 1.0])
  top = s.top_logprobs(logits, 2)
  assert [i for i, _ in top] == [1, 2]
  np.testing.assert_allclose(np.exp([lp for _, lp in s.top_logprobs(logits, 3)]).sum(), 1.0)
