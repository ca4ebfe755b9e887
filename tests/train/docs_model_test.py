"""The shipped `docs` model speaks the corpus, splits exactly, and resolves as --gguf=docs."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from ds4jax import build, cli
from ds4jax import data as shipped
from ds4jax.generate.loop import Generator
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.runtime.load import load_runner
from ds4jax.tokenizer import Tokenizer
from ds4jax.train import data

REPO = pathlib.Path(__file__).resolve().parents[2]


def corpus_share(text):
  words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
  known = data.corpus_words()
  return words, sum(w in known for w in words) / max(len(words), 1)


def test_generate_greedy_speaks_the_corpus(tiny_cache_dir):
  """The acceptance command: most generated words are words of the corpus."""
  env = dict(os.environ, DS4JAX_CACHE=tiny_cache_dir, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), "--gguf=docs",
                      "--prompt=The assert statement", "--nochat", "--max_new_tokens=64",
                      "--temperature=0"], env=env, cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr
  words, share = corpus_share(p.stdout)
  assert len(words) >= 12 and share >= 0.6, (share, p.stdout)


@pytest.fixture(scope="module")
def docs():
  path = cli.resolve_gguf("docs")
  return path, Tokenizer.from_gguf(path)


def test_sampled_speaks_the_corpus(docs):
  path, tok = docs
  gen = Generator(build.local_backend(path, ctx_size=256, max_sessions=1), tok)
  for seed in (0, 1):
    res = gen.generate("The assert statement", max_new_tokens=48, chat=False,
                       sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=seed))
    words, share = corpus_share(res.text)
    assert len(words) >= 8 and share >= 0.6, (share, res.text)


def test_split_equals_single_process(docs):
  """Two stages chained give the whole model's logits bit for bit (the demo checks the same
  over sockets, token by token)."""
  path, tok = docs
  ids = np.asarray(tok.encode("The assert statement is a convenient way", add_bos=True))
  whole = load_runner(path, "all", ctx_size=64, max_chunk=16)
  a, b = load_runner(path, "0:1", ctx_size=64, max_chunk=16), load_runner(
      path, "2:output", ctx_size=64, max_chunk=16)
  ref_TV, _ = whole.forward(whole.init_state(), ids, None, 0)
  hc_TCD, _ = a.forward(a.init_state(), ids, None, 0)
  split_TV, _ = b.forward(b.init_state(), ids, hc_TCD, 0)
  np.testing.assert_array_equal(split_TV, ref_TV)


def test_report_matches_the_file(docs):
  path, tok = docs
  rep = json.loads(shipped.DOCS_REPORT.read_text())
  assert rep["command"].startswith("python scripts/train.py --config=configs/train_docs.py")
  assert rep["study"]["q8"]["bytes"] == os.path.getsize(path)
  assert rep["final_heldout_loss"] < rep["unigram_heldout_loss"] - 1.0
  assert tok.vocab_size == rep["config"]["model"]["vocab_size"]


def test_missing_docs_model_is_a_one_line_error(monkeypatch, tmp_path):
  monkeypatch.setattr(shipped, "DOCS_GGUF", tmp_path / "nope.gguf")
  with pytest.raises(FileNotFoundError, match="scripts/train.py --config=configs/train_docs"):
    cli.resolve_gguf("docs")
