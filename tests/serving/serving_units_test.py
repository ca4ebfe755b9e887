"""Units of the server: Prometheus exposition, the tokens/s window, missing-layer reporting,
request validation and the job wire format of the model process."""

import pytest

from ds4jax.config import LayerRange
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.runtime.types import HopTelemetry
from ds4jax.serving import generation, model_proc, remote, schemas
from ds4jax.serving.engine import SessionTracker, missing_layers
from ds4jax.serving.metrics import Metrics


class _Clock:

  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_histogram_buckets_are_cumulative_and_labels_escaped():
  m = Metrics()
  hops = [HopTelemetry(stage="2:output", host='h"1', compute_s=0.003, queue_s=0.001)]
  m.observe_step(hops, 0.004)
  m.observe_step([{"stage": "2:output", "host": 'h"1', "compute_s": 0.2, "queue_s": 0.0}], 0.2)
  lines = m.render().splitlines()
  hop = [l for l in lines if l.startswith("ds4jax_hop_latency_seconds_bucket")]
  assert 'stage="2:output",host="h\\"1",le="0.0025"} 0' in hop[2]
  assert hop[3].endswith('le="0.005"} 1') and hop[-1].endswith('le="+Inf"} 2')
  counts = [int(l.rsplit(" ", 1)[1]) for l in hop]
  assert counts == sorted(counts)
  assert 'ds4jax_hop_latency_seconds_count{stage="2:output",host="h\\"1"} 2' in lines
  assert "ds4jax_generated_tokens_total 2" in lines


def test_tokens_per_second_window():
  clock = _Clock()
  m = Metrics(clock=clock)
  assert m.tokens_per_second() == 0.0
  for _ in range(20):
    m.observe_step([], 0.1)
    clock.t += 0.5  # 2 tokens/s
  assert m.tokens_per_second() == pytest.approx(2.0, rel=0.06)
  clock.t += 60  # everything left the window
  assert m.tokens_per_second() == 0.0


def test_missing_layers_from_worker_ranges_and_reason():
  from ds4jax.bridge.coordinator import route

  ranges = [LayerRange(2, 3), LayerRange(6, 7, True)]  # the ready workers (4:5 is not)
  assert route.missing_layers(8, LayerRange(0, 1), ranges) == [4, 5]
  assert route.missing_layers(8, LayerRange(0, 1), []) == [2, 3, 4, 5, 6, 7]
  t = SessionTracker(object())
  assert t.uncovered_layers({"missing_layers": [5, 4]}) == [4, 5]
  assert t.uncovered_layers({"workers": []}) is None
  assert missing_layers("missing layer 17", {}) == [17]
  assert missing_layers("missing layers 2-4", {}) == [2, 3, 4]
  assert missing_layers("x", {"missing_layers": [5, 3]}) == [3, 5]


def test_request_validation():
  r = schemas.CompletionRequest(prompt=[0, 5, 9], temperature=0, stop="\n")
  assert r.prompt == [0, 5, 9] and r.stop_list() == ["\n"] and r.sampling().greedy
  assert schemas.CompletionRequest(prompt=["one"]).prompt == "one"
  assert schemas.CompletionRequest(prompt="x", seed=7, temperature=0.5).sampling().seed == 7
  seeds = {schemas.CompletionRequest(prompt="x", temperature=1).sampling().seed for _ in range(5)}
  assert len(seeds) > 1, "no seed: a fresh random stream per request"
  c = schemas.ChatCompletionRequest(messages=[{"role": "developer", "content": [
      {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], max_completion_tokens=5)
  assert c.message_dicts() == [{"role": "system", "content": "ab"}]
  assert c.max_new_tokens(99) == 5
  for bad in [dict(prompt=[-1]), dict(prompt="x", top_p=0), dict(prompt="x", stop=["a"] * 5),
              dict(prompt="x", echo=True), dict(prompt="x", frequency_penalty=0.5),
              dict(prompt="x", logit_bias={"1": 2.0}), dict(prompt=[]), dict(prompt="x", logprobs=2)]:
    with pytest.raises(ValueError):
      schemas.CompletionRequest(**bad)
  with pytest.raises(ValueError, match="logprobs are not supported"):
    schemas.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], logprobs=True)
  assert schemas.CompletionRequest(prompt="x", logprobs=0).logprobs == 0


def test_job_and_events_round_trip_the_wire_format():
  job = generation.GenerationJob(prompt=[0, 1, 2], messages=None, max_tokens=3,
                                 sampling=SamplingParams(temperature=0.7, top_k=5, seed=9),
                                 stop=("x",))
  assert model_proc.job_from_dict(remote._job_to_dict(job)) == job
  for ev in [generation.Piece("héllo"), generation.Finished("length", 3, 4, {"total_s": 1.0}, None, 2),
             generation.Stepped(2, 0.5, (HopTelemetry("0:1", "local", 0.1),))]:
    back = remote._event(model_proc.event_to_dict(ev))
    if isinstance(ev, generation.Stepped):
      assert back.n == 2 and back.telemetry[0]["stage"] == "0:1"
    else:
      assert back == ev
  assert isinstance(remote._error("route", "m"), Exception)
  assert type(remote._error("route", "m")).__name__ == "RouteUnavailable"
  assert isinstance(remote._error("value", "m"), ValueError)
