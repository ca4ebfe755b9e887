"""The shipped `docs` model speaks the corpus, splits exactly, and resolves as --gguf=docs."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from ds4jax import cli
from ds4jax import data as shipped
from ds4jax.generate.local import LocalBackend
from ds4jax.generate.loop import Generator
from ds4jax.generate.sampling import SamplingParams
from ds4jax.tokenizer import Tokenizer
from ds4jax.train import data

REPO = pathlib.Path(__file__).resolve().parents[2]


def corpus_share(text):
  words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
  known = data.corpus_words()
  return words, sum(w in known for w in words) / max(len(words), 1)


def test_generate_greedy_speaks_the_corpus(tmp_path):
  """The acceptance command: most generated words are words of the corpus."""
  env = dict(os.environ, DS4JAX_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
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
  gen = Generator(LocalBackend.from_gguf(path, ctx_size=256), tok)
  for seed in (0, 1):
    res = gen.generate("The assert statement", max_new_tokens=48, chat=False,
                       sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=seed))
    words, share = corpus_share(res.text)
    assert len(words) >= 8 and share >= 0.6, (share, res.text)


def test_split_equals_single_process(docs):
  path, tok = docs
  kw = dict(max_new_tokens=16, chat=False)
  whole = Generator(LocalBackend.from_gguf(path, ctx_size=256), tok).generate("The", **kw)
  split = Generator(LocalBackend.from_gguf(path, ranges=("0:1", "2:2", "3:output"),
                                           ctx_size=256), tok).generate("The", **kw)
  assert split.tokens == whole.tokens and len(whole.tokens) == 16


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
