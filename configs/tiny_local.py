r"""The tiny test model, whole, in one process (CPU, about 10 s the first time).

Command:

    python scripts/generate.py --config=configs/tiny_local.py

Overrides: `--config.prompt="Tell me a story" --config.max_new_tokens=64 --config.temperature=0.7`.
Plain flags (`--max_new_tokens=8`) win over the config. Interactive:

    python scripts/chat.py --config=configs/tiny_local.py
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # 'tiny' builds (once, into $DS4JAX_CACHE or ~/.cache/ds4jax) a 4-layer ds4-layout GGUF.
  c.gguf = "tiny"
  # Every layer and the head run here.
  c.layers = "all"
  c.ctx_size = 512
  c.prefill_chunk = 256
  c.prompt = "Hello, world"
  c.chat = True
  c.thinking = False
  c.max_new_tokens = 16
  # Greedy: the tiny model is random, greedy makes runs comparable.
  c.temperature = 0.0
  c.top_k = 0
  c.top_p = 1.0
  c.seed = 0
  return c
