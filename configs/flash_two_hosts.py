r"""DeepSeek V4 Flash split over two hosts (documented; it needs the real GGUF and two big hosts).

Host A (coordinator; owns the embedding, layers 0:21, the tokenizer and sampling; the only
host with an open port):

    python scripts/generate.py --config=configs/flash_two_hosts.py \
        --config.gguf=/models/DeepSeek-V4-Flash-q2.gguf --prompt="Why is the sky blue?"

Host B (worker; dials in from anywhere, NAT is fine; owns layers 22..42 and the head):

    python scripts/worker.py --gguf=/models/DeepSeek-V4-Flash-q2.gguf --layers=22:output \
        --coordinator=HOST_A:7000

Both hosts hold the same GGUF (the fingerprint is checked at HELLO) and each loads only its
slice. Interactive chat on host A: `python scripts/chat.py --config=configs/flash_two_hosts.py`.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.gguf = "/models/DeepSeek-V4-Flash-q2.gguf"
  # Flash has 43 layers; an even split by layer count (experts dominate the bytes).
  c.layers = "0:21"
  c.workers = ["22:output"]
  c.listen = "0.0.0.0:7000"
  c.route_timeout = 600.0
  # bf16 halves the 64 KiB/token HC payload; f32 is exact.
  c.activation_dtype = "bf16"
  c.ctx_size = 32768
  c.prefill_chunk = 512
  c.prompt = "Why is the sky blue?"
  c.chat = True
  c.thinking = False
  c.max_new_tokens = 256
  c.temperature = 0.6
  c.top_k = 0
  c.top_p = 0.95
  c.seed = 0
  return c
