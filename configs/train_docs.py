r"""Trains `docs`, the small DeepSeek V4 that the demo runs, on Python's own help topics.

Command (the one that produced the committed ds4jax/data/docs.gguf; about 8 minutes on one
CPU core):

    python scripts/train.py --config=configs/train_docs.py \
        --workdir=/tmp/ds4jax-train-docs --out=ds4jax/data/docs.gguf

Run it again with the same --workdir and it resumes from the last checkpoint. The CI-sized
variant (a few seconds of steps on a tiny model):

    python scripts/train.py --config=configs/train_docs.py:tiny --workdir=/tmp/t --out=/tmp/t.gguf

Overrides: `--config.steps=2000 --config.lr=2e-3`.
"""

import ml_collections

# 4 layers in ds4's schedule (SWA, SWA, CSA + indexer, HCA), layer 0 hash-routed; d_model
# and expert_ff are multiples of 256, so the routed experts can be stored as Q2_K / IQ2_XXS.
DOCS_MODEL = dict(
    n_layers=4, d_model=256, vocab_size=2048, n_heads=4, head_dim=128, rope_dim=64,
    q_lora_rank=64, o_groups=2, o_lora_rank=32, n_experts=8, n_experts_used=2,
    n_shared_experts=1, expert_ff=256, n_hash_layers=1, window=64,
    compress_ratios=(0, 0, 4, 16), index_heads=8, index_head_dim=128, index_topk=16,
    context_length=4096,
)
# The CI-sized model: the same schedule, every width small.
TINY_MODEL = dict(
    n_layers=4, d_model=64, vocab_size=320, n_heads=2, head_dim=32, rope_dim=16,
    q_lora_rank=32, o_groups=2, o_lora_rank=16, n_experts=4, n_experts_used=2,
    n_shared_experts=1, expert_ff=64, n_hash_layers=1, window=16,
    compress_ratios=(0, 0, 4, 16), index_heads=2, index_head_dim=32, index_topk=4,
    context_length=1024,
)


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.model = dict(DOCS_MODEL)
  # Held-out topics (ds4jax.train.data.HELD_OUT): none of their lines occurs elsewhere.
  c.held_out = ("binary", "dict", "global", "import", "lambda", "objects")
  c.seed = 0
  c.seq_len = 256
  c.batch_size = 4
  c.steps = 420
  # AdamW, linear warm-up then cosine decay to lr * final_lr_frac, global-norm clipping.
  c.lr = 3e-3
  c.warmup_steps = 30
  c.final_lr_frac = 0.05
  c.b1 = 0.9
  c.b2 = 0.95
  c.weight_decay = 0.1
  c.clip_norm = 1.0
  # Router bias step of the auxiliary-loss-free balancing (ds4jax.train.model.balance_bias).
  c.bias_rate = 1e-3
  # Rows per expert block in the training MoE (ds4jax.train.model.grouped_experts).
  c.expert_block = 64
  c.log_every = 10
  c.eval_every = 50
  c.checkpoint_every = 100
  if arg == "tiny":
    c.model = dict(TINY_MODEL)
    c.seq_len = 64
    c.batch_size = 2
    c.steps = 8
    c.warmup_steps = 2
    c.lr = 1e-2
    c.expert_block = 16
    c.log_every = 1
    c.eval_every = 4
    c.checkpoint_every = 4
  elif arg is not None:
    raise ValueError(f"unknown variant {arg!r}: expected none or 'tiny'")
  return c
