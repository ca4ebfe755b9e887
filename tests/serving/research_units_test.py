"""The server's per-request steering and capture (serving/research.py) without a model run:
how a request's options merge with the server's flags, which file names a request may use,
the cache, the byte bound before compute, the response encoding, the request schema and the
job's trip over the model-process link. The tiny model's header gives the config."""

import os

import numpy as np
import pydantic
import pytest

from ds4jax.runtime import sources
from ds4jax.runtime.capture import Captured
from ds4jax.runtime.edits import Interventions
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.serving import generation, model_proc, remote, schemas
from ds4jax.serving.research import (BadRequest, Research, decode_captured, encode_captured,
                                     plain_name)


@pytest.fixture(scope="module")
def cfg(tiny_gguf):
  return sources.model_info(tiny_gguf)[0]


def _unit_rows(cfg, seed, path):
  d = np.random.default_rng(seed).standard_normal((cfg.n_layers, cfg.d_model))
  (d / np.linalg.norm(d, axis=1, keepdims=True)).astype("<f4").tofile(path)


@pytest.fixture
def steer_dir(cfg, tmp_path):
  d = tmp_path / "steer"
  d.mkdir()
  _unit_rows(cfg, 0, d / "d.f32")
  _unit_rows(cfg, 1, tmp_path / "outside.f32")
  (d / "bad.f32").write_bytes(b"\0" * 12)
  m = np.zeros((cfg.n_layers, cfg.n_experts), "<f4")
  m[:, 3] = 1.0
  m.tofile(d / "e.f32")
  return d


def test_request_options_override_the_server_flags(cfg, steer_dir, tmp_path):
  server = str(tmp_path / "outside.f32")  # the operator's flag may name any path
  r = Research(cfg, defaults={"dir_steering_file": server, "dir_steering_ffn": 2.0},
               steering_dir=str(steer_dir))
  assert r.options(None) == {"dir_steering_file": server, "dir_steering_ffn": 2.0,
                             "dir_steering_attn": 0.0}
  assert r.options({"dir_steering_attn": 0.5}) == {
      "dir_steering_file": server, "dir_steering_ffn": 2.0, "dir_steering_attn": 0.5}
  assert r.options({"dir_steering_file": "d.f32"})["dir_steering_file"] == str(steer_dir /
                                                                              "d.f32")
  # Off: scales of 0, or the file null.
  assert r.options({"dir_steering_ffn": 0}) == {}
  assert r.options({"dir_steering_file": None}) == {}
  assert r.edits({"dir_steering_ffn": 0.0}) is None
  both = r.options({"expert_steering_file": "e.f32", "expert_steering_scale": 1.0})
  assert set(both) == {"dir_steering_file", "dir_steering_ffn", "dir_steering_attn",
                       "expert_steering_file", "expert_steering_scale"}
  assert r.options({"expert_steering_file": "e.f32", "dir_steering_ffn": 0}) == {
      "expert_steering_file": str(steer_dir / "e.f32"), "expert_steering_scale": 0.01}
  # The server's default equals the same steering built directly.
  assert r.edits(None).key == Interventions.ds4_steering(server, cfg, ffn=2.0).key
  assert r.edits({"dir_steering_file": "d.f32", "dir_steering_ffn": 2}).key == (
      Interventions.ds4_steering(steer_dir / "d.f32", cfg, ffn=2.0).key)


@pytest.mark.parametrize("steering, needle", [
    ({"dir_steering_file": "../outside.f32"}, "plain names in the server's --steering_dir"),
    ({"dir_steering_file": "/etc/passwd"}, "plain names"),
    ({"expert_steering_file": "a/e.f32"}, "plain names"),
    ({"dir_steering_file": ".."}, "plain names"),
    ({"dir_steering_file": "bad.f32"}, "steering file bad.f32 has 12 bytes; this model needs "
                                       "L x D = 4 x 256 float32"),
    ({"expert_steering_file": "bad.f32"}, "needs L x E = 4 x 8 float32"),
    ({"dir_steering_file": "none.f32"}, "steering file not found: none.f32"),
    ({"expert_steering_scale": 1.0}, "expert_steering_scale needs expert_steering_file"),
    ({"dir_steering_ffn": float("nan")}, "must be a finite number"),
    ({"steering_file": "d.f32"}, "unknown steering option 'steering_file'"),
])
def test_bad_steering_is_one_line_without_the_server_path(cfg, steer_dir, steering, needle):
  r = Research(cfg, steering_dir=str(steer_dir))
  with pytest.raises(BadRequest) as e:
    r.edits(steering)
  msg = str(e.value)
  assert needle in msg and "\n" not in msg and str(steer_dir) not in msg, msg


def test_no_steering_dir_no_file_names(cfg, steer_dir):
  with pytest.raises(BadRequest, match="start it with --steering_dir"):
    Research(cfg).edits({"dir_steering_file": "d.f32"})
  with pytest.raises(FileNotFoundError, match="--steering_dir is not a directory"):
    Research(cfg, steering_dir=str(steer_dir / "nope"))
  with pytest.raises(ValueError, match="needs L x D"):  # the server's own flags, at start
    Research(cfg, defaults={"dir_steering_file": str(steer_dir / "bad.f32")})
  assert Research(None).edits(None) is None  # a backend without a config serves plain runs
  with pytest.raises(BadRequest, match="no model config"):
    Research(None).capture({"points": "ffn_out"}, 4, 4, 128)
  assert [plain_name(n) for n in ("d.f32", ".hidden", "a/b", "", ".", "a\\b", "x\0")] == [
      True, True, False, False, False, False, False]


def test_steering_is_cached_until_its_file_changes(cfg, steer_dir):
  r = Research(cfg, steering_dir=str(steer_dir))
  a = r.edits({"dir_steering_file": "d.f32"})
  assert r.edits({"dir_steering_file": "d.f32", "dir_steering_ffn": 1.0}) is a  # ds4's default
  assert r.edits({"dir_steering_file": "d.f32", "dir_steering_ffn": 2.0}) is not a
  _unit_rows(cfg, 5, steer_dir / "d.f32")
  st = os.stat(steer_dir / "d.f32")
  os.utime(steer_dir / "d.f32", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  b = r.edits({"dir_steering_file": "d.f32"})
  assert b is not a and b.key != a.key


def test_capture_is_checked_and_bounded_before_compute(cfg):
  row = 4 * cfg.d_model  # ffn_out, float32 [D]
  # 10 prompt tokens + 8 new: 17 positions run through the model, on each of 4 layers.
  r = Research(cfg, max_capture_bytes=17 * 4 * row)
  spec = r.capture({"points": "ffn_out"}, 10, 8, 128)
  assert spec.names() == [f"ffn_out.{i}" for i in range(4)]
  r.max_capture_bytes -= 1
  with pytest.raises(BadRequest, match=r"up to 17 positions x 4 arrays needs 69632 bytes, "
                                       r"over this server's limit of 69631 \(--max_capture_mb\)"):
    r.capture({"points": "ffn_out"}, 10, 8, 128)
  assert r.capture({"points": "ffn_out", "positions": "last"}, 10, 8, 128).positions == "last"
  assert r.capture({"points": ["ffn_out"], "layers": [1, 2], "positions": "0:3"}, 10, 8,
                   128).names() == ["ffn_out.1", "ffn_out.2"]
  # The context bounds the tokens: 126 + 3 new at most in 128.
  r.max_capture_bytes = 128 * 4 * row
  r.capture({"points": "ffn_out"}, 126, 1000, 128)
  for cap, needle in [({"points": "ffn_out", "layers": "2:9"}, "capture layer 4 is out of range"),
                      ({"points": "ffn_out,nope"}, "unknown capture point 'nope'"),
                      ({"layers": "1"}, "name the points")]:
    with pytest.raises(BadRequest, match=needle):
      r.capture(cap, 10, 8, 128)
  with pytest.raises(BadRequest, match="takes no captures"):
    Research(cfg, max_capture_bytes=0).capture({"points": "ffn_out"}, 10, 8, 128)


def test_captured_encoding_round_trips():
  cap = Captured(np.arange(3, dtype=np.int64),
                 {"ffn_out.1": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
                  "router_ids.2": np.array([[1, 7], [0, 3], [5, 5]], np.int32)})
  enc = encode_captured(cap)
  assert enc["positions"] == [0, 1, 2]
  assert enc["arrays"]["ffn_out.1"]["shape"] == [3, 4]
  assert enc["arrays"]["router_ids.2"]["dtype"] == "int32"
  back = decode_captured(enc)
  assert back.positions.tolist() == [0, 1, 2] and sorted(back.keys()) == sorted(cap.keys())
  for k in cap.arrays:
    np.testing.assert_array_equal(back[k], cap[k])
    assert back[k].dtype == cap[k].dtype


def test_request_fields_and_their_trip_to_the_model_process():
  body = {"prompt": "x"}
  assert schemas.CompletionRequest(**body).research() == {"steering": None, "capture": None}
  off = schemas.CompletionRequest(**body, steering=None).research()["steering"]
  assert off == {"dir_steering_file": None, "expert_steering_file": None}
  got = schemas.ChatCompletionRequest(
      messages=[{"role": "user", "content": "x"}], steering={"dir_steering_ffn": 0.5},
      capture={"points": "ffn_out,router_ids", "layers": [1]}).research()
  assert got == {"steering": {"dir_steering_ffn": 0.5},
                 "capture": {"points": "ffn_out,router_ids", "layers": [1], "positions": "all"}}
  for bad in [dict(steering={"dir_steering_file": "../x.f32"}),
              dict(steering={"dir_steering_ffn": "lots"}),
              dict(steering={"dir_steering_scale": 1}),
              dict(capture={"points": "nope"}),
              dict(capture={"points": "ffn_out", "layers": "a:b"}), dict(capture={"layers": "1"})]:
    with pytest.raises(pydantic.ValidationError):
      schemas.CompletionRequest(**body, **bad)
  job = generation.GenerationJob(prompt="x", messages=None, max_tokens=3,
                                 sampling=SamplingParams(), steering=got["steering"],
                                 capture=got["capture"])
  assert model_proc.job_from_dict(remote._job_to_dict(job)) == job
  fin = generation.Finished("length", 3, 4, {}, encode_captured(
      Captured(np.arange(2), {"ffn_out.1": np.ones((2, 3), np.float32)})))
  assert remote._event(model_proc.event_to_dict(fin)) == fin
  assert isinstance(remote._error("request", "m"), BadRequest)
  assert model_proc.error_kind(BadRequest("m")) == "request"
