"""Multi-device stages (issue 14): expert parallelism over a stage mesh (model.sharding).

The end-to-end checks run once, in a fresh process with 4 forced CPU devices
(`sharded_probe.py`: this process's JAX already started with one). Measured there on the
tiny model (CPU, k = 2 experts per token): greedy decode logits on 2 and 4 devices, and the
in-process split's prefill and decode, are bit-identical to one device's (a token's routed
sum has at most two nonzero partial sums, which psum adds exactly); the dense all-experts
path on one MoE layer differs by 1.4e-6 on outputs of magnitude ~4 (psum changes the
summation order). On the bench preset (k = 4; measured by hand, not here) logits differ by at
most 5.7e-6 (prefill) / 3.0e-6 (decode) of magnitude 4.4, argmax unchanged. The bound
asserted is 2e-5.
"""

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from ds4jax.model import sharding
from ds4jax.quant.packed import Packed

pytestmark = pytest.mark.e2e

HERE = os.path.dirname(os.path.abspath(__file__))
BOUND = 2e-5


@pytest.fixture(scope="module")
def probe(tiny_gguf):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                 [os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")]))
  p = subprocess.run([sys.executable, os.path.join(HERE, "sharded_probe.py"), tiny_gguf],
                     capture_output=True, text=True, timeout=600, env=env)
  assert p.returncode == 0, p.stderr[-4000:]
  res = json.loads(p.stdout.strip().splitlines()[-1])
  assert res["devices"] == 4
  return res


def test_greedy_tokens_on_1_2_4_devices_are_one_devices(probe):
  runs = probe["runs"]
  for weights, counts in (("packed", (2, 4)), ("dequantized", (4,))):
    want = runs[f"{weights}/1"]["tokens"]
    for n in counts:
      r = runs[f"{weights}/{n}"]
      assert r["tokens"] == want, (weights, n)
      assert r["max_abs_dlogit"] <= BOUND, (weights, n, r["max_abs_dlogit"])


def test_expert_streaming_on_2_devices_is_one_devices_resident_run(probe):
  """--ssd_streaming with --devices=2: the streamed experts run replicated (no psum), so the
  logits are one device's resident ones bit for bit."""
  r = probe["streamed/2"]
  assert r["mesh_devices"] == 2 and r["expert_bytes"] == 0 and r["state_replicated"]
  assert r["tokens"] == probe["runs"]["packed/1"]["tokens"]
  assert r["max_abs_dlogit"] == 0.0


def test_decode_state_stays_replicated_on_the_mesh(probe):
  assert all(r["state_replicated"] for r in probe["runs"].values())


def test_each_device_holds_its_share_of_the_experts(probe):
  for key, r in probe["runs"].items():
    n = int(key.split("/")[1])
    per = r["per_device"]
    assert len(per) == n
    other = r["whole"] - r["expert_bytes"]
    for d in per.values():
      # Exactly E/N experts' bytes (packed planes too), and every other parameter whole.
      assert d["experts"] * n == r["expert_bytes"], (key, d)
      assert d["other"] == other, (key, d)


def test_compile_first_sharded_runner_compiles_nothing_more(probe):
  # load_runner(devices=4, compile_sizes=(1,)) compiled the decode step from shapes (with
  # the weights' shardings): decoding traced nothing new.
  assert probe["runs"]["packed/4"]["new_traces"] == 0


def test_split_with_a_4_device_stage_and_a_1_device_stage(probe):
  # In-process LocalBackend chain: layers 0:1 on 4 devices, 2:output on 1, 2-token prefill
  # then decode; against the whole model in one runner on one device.
  split = probe["split"]
  assert split["mesh_devices"] == [4, 1]
  assert split["tokens"] == split["want"]
  assert split["max_abs_dlogit"] <= BOUND


def test_grouped_and_all_experts_paths_under_the_mesh(probe):
  # One MoE layer on 8 tokens: packed experts take the grouped path, dense the all-experts.
  for weights, (diff, scale) in probe["moe"].items():
    assert scale > 0.1 and diff <= BOUND, (weights, diff)


# ------------------------------------------------------------------------ in this process
def test_one_device_is_no_mesh(tiny_gguf):
  from ds4jax.runtime.load import load_stage
  from ds4jax.runtime.runner import StageRunner
  assert sharding.make_mesh(1) is None and sharding.make_mesh("all") is None  # 1 CPU device
  stage = load_stage(tiny_gguf, "0:0", devices=1)
  assert stage.blocks[0].moe.expert_mesh is None
  assert StageRunner(stage, ctx_size=8, max_chunk=1).mesh is None


@pytest.mark.parametrize("spec, msg", [
    (0, "positive integer or 'all'"), ("0", "positive integer or 'all'"),
    (-2, "positive integer or 'all'"),
    ("1.5", "positive integer or 'all'"), ("two", "positive integer or 'all'"),
    (1.0, "positive integer or 'all'"), (2, "exceeds the 1 local device"),
])
def test_bad_device_counts_are_one_line_errors(spec, msg):
  with pytest.raises(ValueError, match=msg) as e:
    sharding.parse_devices(spec)
  assert "\n" not in str(e.value)


def test_devices_must_divide_the_experts(tiny_gguf):
  sharding.check_experts(8, 4)
  with pytest.raises(ValueError, match="--devices=3 does not divide the model's 8 experts"):
    sharding.check_experts(8, 3)
  from ds4jax.runtime.load import load_stage
  with pytest.raises(ValueError, match="exceeds the 1 local device"):
    load_stage(tiny_gguf, "0:0", devices=2)


def test_the_rules_table():
  e = sharding.EXPERT_AXIS
  for name in ("gate_exps", "up_exps", "down_exps"):
    assert sharding.param_spec(("blocks", 3, "moe", name), (8, 256, 256)) == P(e, None, None)
  for path, shape in ((("blocks", 0, "moe", "gate"), (8, 256)), (("blocks", 0, "moe", "bias"), (8,)),
                      (("blocks", 0, "moe", "shared_up"), (256, 256)),
                      (("blocks", 0, "attn", "q_a"), (64, 256)), (("embed", "embedding"), (512, 256)),
                      (("head", "out"), (512, 256))):
    assert sharding.param_spec(path, shape) == P(*(None,) * len(shape)), path
  # Packed planes take the element spec's leading axes: [E, F, B, ...] split on axis 0.
  packed = Packed.abstract(8, (8, 256, 256), "float32")  # Q8_0
  assert sharding._plane_spec(P(e, None, None), packed) == P(e, None)
  with pytest.raises(ValueError, match="an axis twice"):
    sharding.logical_to_mesh(("expert", "expert"))


def test_cli_devices_flag_values():
  from ds4jax.config import devices_option
  assert devices_option("all") == "all" and devices_option("4") == 4
  assert devices_option(2) == 2
  for bad in ("0", "-1", "x", "2.0", True):
    with pytest.raises(ValueError, match="--devices must be a positive integer or 'all'"):
      devices_option(bad)
