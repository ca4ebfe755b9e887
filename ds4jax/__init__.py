"""ds4jax: layer-split (pipeline) inference of DeepSeek V4 GGUFs in JAX/Flax NNX.

Re-exports are lazy, so that `import ds4jax.wire.protocol` (stdlib + numpy only) does not
pull in JAX.

    import ds4jax
    model = ds4jax.load_model("model.gguf", layers="all", dtype="float32")
    logits = model.logits([0, 1, 2])
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "ds4jax.config",
    "LayerRange": "ds4jax.config",
    "load_model": "ds4jax.build",
    "Model": "ds4jax.runtime.api",
    "Session": "ds4jax.runtime.api",
    "load_stage": "ds4jax.runtime.sources",
    "open_source": "ds4jax.runtime.sources",
    "Stage": "ds4jax.model.stage",
    "StageRunner": "ds4jax.runtime.runner",
    "StageState": "ds4jax.model.decode_state",
    "hf_to_gguf": "ds4jax.gguf.hf",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'ds4jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
