"""Models that ship with ds4jax, and the cache directory where built ones are kept.

`docs.gguf` is the `docs` model (`--gguf=docs`): a 4-layer DeepSeek V4 trained by
`scripts/train.py --config=configs/train_docs.py` on Python's help topics
(`pydoc_data.topics`), ds4 quant mix with Q8_0 routed experts. `docs.json` is the report of
the run that produced it: the command, the loss curve, held-out perplexities (f32, Q8_0 and
q2 experts, and the unigram baseline), tok/s and the wall time.

`cache_root()` is where the random `tiny` / `bench` models are built once
(`ds4jax.gguf.tiny.tiny_gguf_path`) and where XLA's persistent compilation cache lives.
"""

from __future__ import annotations

import os
import pathlib

DIR = pathlib.Path(__file__).resolve().parent
DOCS_GGUF = DIR / "docs.gguf"
DOCS_REPORT = DIR / "docs.json"
DOCS_COMMAND = ("python scripts/train.py --config=configs/train_docs.py "
                "--workdir=/tmp/ds4jax-train-docs --out=ds4jax/data/docs.gguf")


def docs_gguf_path() -> str:
  """The path of the shipped `docs` model; a one-line error if it is missing."""
  if not DOCS_GGUF.is_file():
    raise FileNotFoundError(f"the docs model is missing ({DOCS_GGUF}); rebuild it with: "
                            f"{DOCS_COMMAND}")
  return str(DOCS_GGUF)


def cache_root(path: str | os.PathLike | None = None) -> pathlib.Path:
  """`path`, else `$DS4JAX_CACHE`, else `~/.cache/ds4jax`; created if needed."""
  d = pathlib.Path(path or os.environ.get("DS4JAX_CACHE") or
                   pathlib.Path.home() / ".cache" / "ds4jax")
  d.mkdir(parents=True, exist_ok=True)
  return d
