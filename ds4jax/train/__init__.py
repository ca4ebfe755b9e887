"""Training small DeepSeek V4 models with the inference modules (issue 15).

- `data`: the corpus (`pydoc_data.topics`, read at run time), held-out topics, the
  byte-level BPE with ds4's pre-split and special tokens, training windows;
- `model`: the training forward over the same `Stage` the runner serves, and what trains;
- `trainer`: AdamW + warm-up/cosine + clipping, a jitted donated step, eval, orbax resume;
- `export`: ds4-layout GGUFs (Q8_0, q2 and f32 experts) and the run report.

`scripts/train.py --config=configs/train_docs.py` trains the `docs` model the demo runs.
"""
