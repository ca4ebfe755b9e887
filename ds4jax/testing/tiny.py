"""Deterministic, seeded tiny GGUFs with the exact ds4 layout and quant mix.

Quant mix (`experts="iq2"`, ds4's q2 recipe): Q8_0 projections, shared experts and head; F16
embedding, HC fn, compressor, indexer and router; F32 norms, sinks, biases, HC base/scale;
I32 tid2eid; IQ2_XXS gate/up and Q2_K down routed experts. gguf-py cannot quantise the K/IQ
types, so those are random raw blocks whose f16 scale fields are set to small values
(ds4-architecture.md §4.6); every byte pattern is a valid block.

Weights are scaled to keep activations sane: std 1/sqrt(fan_in) for projections, norms
near 1, small sinks, biases and HC bases.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import zlib

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

from ds4jax.config import LayerRange, ModelConfig
from ds4jax.gguf import names
from ds4jax.gguf.writer import RawTensor, write_gguf

PRESETS = ("tiny", "bench")
EXPERT_RECIPES = {
    "iq2": (Q.IQ2_XXS, Q.Q2_K),   # ds4 "q2": IQ2_XXS gate/up, Q2_K down
    "q4": (Q.Q4_K, Q.Q4_K),       # ds4 "q4"
    "q8": (Q.Q8_0, Q.Q8_0),
}
# Byte offsets of the f16 scale fields (d, then dmin) in one block.
_SCALE_FIELDS = {Q.IQ2_XXS: (0, None), Q.Q2_K: (80, 82), Q.Q4_K: (0, 2)}
# dmin / d that centres the block values near zero: E[scale * q] = ratio * E[min].
_DMIN_RATIO = {Q.Q2_K: 1.5, Q.Q4_K: 7.5}


def preset_config(preset: str, **overrides) -> ModelConfig:
  if preset == "tiny":
    return ModelConfig.tiny(**overrides)
  if preset == "bench":
    return ModelConfig.bench(**overrides)
  raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")


def _rng(seed: int, name: str) -> np.random.Generator:
  """One generator per tensor, so a tensor's values do not depend on the others."""
  return np.random.default_rng([seed, zlib.crc32(name.encode())])


def raw_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype: Q,
               std: float) -> RawTensor:
  """Random valid K/IQ blocks for a float tensor of numpy `shape`, values of about `std`.

  Pipeline:
    1. random bytes for every block;
    2. scale fields d = 1 (and dmin = ratio) on a calibration sample, dequantise, measure rms;
    3. d = std / rms times a per-block factor in [0.75, 1.25], written as f16.
  """
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
  blocks = rng.integers(0, 256, size=(int(np.prod(shape)) // block, type_size), dtype=np.uint8)
  d_off, m_off = _SCALE_FIELDS[qtype]
  ratio = _DMIN_RATIO.get(qtype, 0.0)

  def set_scales(b, d):
    b[:, d_off:d_off + 2] = d.astype(np.float16)[:, None].view(np.uint8)
    if m_off is not None:
      b[:, m_off:m_off + 2] = (d * ratio).astype(np.float16)[:, None].view(np.uint8)

  sample = blocks[:64].copy()
  set_scales(sample, np.ones(len(sample), np.float32))
  rms = float(np.sqrt(np.mean(gguf.quants.dequantize(sample, qtype) ** 2)))
  d = (std / rms) * rng.uniform(0.75, 1.25, size=len(blocks)).astype(np.float32)
  set_scales(blocks, d)
  return RawTensor(blocks.reshape(byte_shape), qtype)


def _init(spec: names.TensorSpec, shape: tuple[int, ...], rng: np.random.Generator,
          cfg: ModelConfig) -> np.ndarray:
  """Float init by role. `shape` is numpy orientation, so the fan-in is the last axis."""
  leaf = spec.path[-1]
  if spec.ds4_type == Q.I32:
    # tid2eid: k distinct experts per token.
    return np.argsort(rng.random((cfg.vocab_size, cfg.n_experts)), axis=1)[:, :cfg.n_experts_used]
  if leaf == "scale" and spec.path[-2] != "hc_attn" and spec.path[-2] != "hc_ffn":
    return 1.0 + 0.1 * rng.standard_normal(shape)          # RMSNorm weights
  if leaf in ("scale", "hc_scale"):
    return rng.uniform(0.2, 1.0, shape)                     # HC scales
  if leaf in ("base", "hc_base", "sinks", "ape"):
    return 0.1 * rng.standard_normal(shape)
  if leaf == "bias":
    return 0.01 * rng.standard_normal(shape)
  if leaf == "embedding":
    return rng.standard_normal(shape)
  return rng.standard_normal(shape) / np.sqrt(shape[-1])   # projections: 1/sqrt(fan_in)


def build_tensors(cfg: ModelConfig, *, seed: int = 0, experts: str = "iq2",
                  layers: LayerRange | None = None) -> dict[str, object]:
  """Every tensor a ds4 file of `cfg` carries (router bias on non-hash layers only).

  Returns `{gguf_name: float32/int32 array or RawTensor}` in numpy orientation.
  """
  if experts not in EXPERT_RECIPES:
    raise ValueError(f"unknown expert recipe {experts!r}: expected one of {sorted(EXPERT_RECIPES)}")
  gate_up_t, down_t = EXPERT_RECIPES[experts]
  layers = (layers or LayerRange.parse("all")).resolve(cfg.n_layers)
  out: dict[str, object] = {}
  for name in names.ds4_tensor_names(cfg, layers):
    spec, il = names.lookup(name)
    shape = spec.numpy_shape(cfg, il)
    rng = _rng(seed, name)
    if spec.is_expert and experts != "q8":
      qtype = down_t if spec.path[-1] == "down_exps" else gate_up_t
      out[name] = raw_blocks(rng, shape, qtype, std=1.0 / np.sqrt(shape[-1]))
    else:
      arr = _init(spec, shape, rng, cfg)
      out[name] = arr.astype(np.int32 if spec.ds4_type == Q.I32 else np.float32)
  return out


def make_tiny_gguf(path: str | os.PathLike, preset: str = "tiny", *, seed: int = 0,
                   experts: str = "iq2", types: str = "ds4", **overrides) -> str:
  """Writes a deterministic tiny ds4-layout GGUF and returns its path."""
  cfg = preset_config(preset, **overrides)
  tensors = build_tensors(cfg, seed=seed, experts=experts)
  return write_gguf(path, cfg, tensors, types=types, name=f"ds4jax-{preset}",
                    extra_metadata={"ds4jax.seed": seed})


def code_version() -> str:
  """Hash of the code that decides a fixture's bytes, so caches rebuild when it changes."""
  from ds4jax import config
  from ds4jax.gguf import writer
  from ds4jax.testing import tiny_vocab
  h = hashlib.sha256(gguf.__version__.encode() if hasattr(gguf, "__version__") else b"")
  for mod in (config, names, writer, tiny_vocab):
    h.update(pathlib.Path(mod.__file__).read_bytes())
  h.update(pathlib.Path(__file__).read_bytes())
  return h.hexdigest()[:12]


def cache_root(path: str | os.PathLike | None = None) -> pathlib.Path:
  """`path`, else `$DS4JAX_CACHE`, else `~/.cache/ds4jax`; created if needed."""
  d = pathlib.Path(path or os.environ.get("DS4JAX_CACHE") or
                   pathlib.Path.home() / ".cache" / "ds4jax")
  d.mkdir(parents=True, exist_ok=True)
  return d


def tiny_gguf_path(preset: str = "tiny", cache_dir: str | os.PathLike | None = None, *,
                   seed: int = 0, experts: str = "iq2", types: str = "ds4") -> str:
  """Builds the fixture once into the cache (keyed by preset, seed, recipe and code version)
  and returns its path. Safe against concurrent builders: written to a temp file, then renamed."""
  d = cache_root(cache_dir)
  path = d / f"{preset}-s{seed}-{experts}-{types}-{code_version()}.gguf"
  if not path.exists():
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".gguf.tmp")
    os.close(fd)
    try:
      make_tiny_gguf(tmp, preset, seed=seed, experts=experts, types=types)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  return str(path)
