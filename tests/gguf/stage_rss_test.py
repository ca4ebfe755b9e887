"""Loading a stage holds its weights once: each tensor is dequantised, placed and dropped
before the next one, so the host never holds the numpy slice next to the device copy.

Measured with tracemalloc (numpy's buffers and every Python allocation, not the device
copies), which depends only on the code, not on the host: on the bench file the load's peak is
about a quarter of the parameter bytes (a tenth with weights="dequantized"); holding the slice
would be at least all of them. The process's peak RSS is scripts/bench.py's figure (its "Peak
memory" table).
"""

import tracemalloc

import jax
from flax import nnx

from ds4jax.gguf import reader
from ds4jax.runtime.load import load_stage


def test_load_stage_peak_is_the_weights_once(bench_gguf):
  reader.open_gguf(bench_gguf)  # the file's metadata, parsed once and cached: not the load's
  tracemalloc.start()
  try:
    stage = load_stage(bench_gguf, "all")
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  params = sum(v.nbytes for v in jax.tree.leaves(nnx.state(stage)))
  print(f"\nhost peak {peak / 2**20:.1f} MiB for {params / 2**20:.1f} MiB of weights")
  assert peak < 0.5 * params, (peak, params)
