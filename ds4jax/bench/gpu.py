"""The decode floor on an accelerator: weight bytes read per token / measured memory bandwidth.

    python -m ds4jax.bench.gpu bandwidth            # prints GB/s of a device copy
    python -m ds4jax.bench.gpu floor A.json [B.json ...] [--gbs=N]

`floor` reads scripts/bench.py result files and prints a markdown table: decode ms/token
(single process and split) against the floor, where the bytes per token are every weight the
step reads: all non-expert tensors, the k routed experts a token uses (k/E of the expert
tensors), one embedding row and the head; float32 as loaded. The KV state read is left out
(short contexts), so the floor is a lower bound.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def hbm_bandwidth_gbs(n_bytes: int = 1 << 30, reps: int = 10) -> float:
  """GB/s of `y = x + 1` over a float32 array (one read and one write per element)."""
  import jax
  import jax.numpy as jnp
  from ds4jax.bench.measure import median_call_s
  x = jnp.zeros((n_bytes // 4,), jnp.float32)
  return 2 * n_bytes / median_call_s(jax.jit(lambda a: a + 1.0), x, reps=reps) / 1e9


def decode_weight_bytes(gguf: str, bytes_per_value: int | None = None) -> int:
  """Weight bytes one decode step reads for the whole model: one embedding row, the chosen
  experts' share of the routed tensors (k / E), every other tensor whole. `bytes_per_value`
  None counts each tensor's bytes in the file (the packed weights, the default); 4 counts
  float32 values (the dequantised path)."""
  from ds4jax.config import LayerRange
  from ds4jax.gguf import names
  from ds4jax.gguf.reader import open_gguf
  f = open_gguf(gguf)
  cfg = f.cfg
  total = 0.0
  for name in names.ds4_tensor_names(cfg, LayerRange.parse("all", cfg.n_layers)):
    spec, il = names.lookup(name)
    shape = spec.numpy_shape(cfg, il)
    n = float(np.prod(shape))
    share = 1.0
    if name == "token_embd.weight":
      share = 1.0 / shape[0]  # one row
    elif name.endswith("tid2eid.weight"):
      share = cfg.n_experts_used / n
    elif spec.is_expert:
      share = min(1.0, cfg.n_experts_used / cfg.n_experts)
    size = n * bytes_per_value if bytes_per_value else float(f.nbytes(name)) if name in f \
        else 0.0
    total += size * share
  return int(total)


def floor_table(paths: list[str], gbs: float) -> str:
  out = ["| model | configuration | decode ms/token | weight MB/token | floor ms/token | "
         "floor / measured |", "|---|---|---|---|---|---|"]
  for p in paths:
    res = json.loads(open(p).read())
    wb = decode_weight_bytes(res["model"]["gguf"])
    floor_ms = 1e3 * wb / (gbs * 1e9)
    rows = [("single process", res["single"])]
    rows += [(f"split, {n} worker(s)", sp) for n, sp in sorted(res.get("split", {}).items())]
    for name, r in rows:
      ms = r["decode"]["ms_per_token_median"]
      out.append(f"| {res['model']['preset']} | {name} | {ms:.2f} | {wb / 1e6:.1f} | "
                 f"{floor_ms:.3f} | {floor_ms / ms:.3f} |")
  return "\n".join(out)


def main(argv: list[str]) -> None:
  if len(argv) >= 2 and argv[1] == "bandwidth":
    print(f"{hbm_bandwidth_gbs():.1f}")
    return
  if len(argv) >= 3 and argv[1] == "floor":
    gbs = [float(a.split("=", 1)[1]) for a in argv[2:] if a.startswith("--gbs=")]
    paths = [a for a in argv[2:] if not a.startswith("--gbs=")]
    print(floor_table(paths, gbs[0] if gbs else hbm_bandwidth_gbs()))
    return
  print("usage: python -m ds4jax.bench.gpu bandwidth | floor RESULT.json ... [--gbs=N]",
        file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  main(sys.argv)
