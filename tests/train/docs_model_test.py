"""The shipped `docs` model speaks the corpus, its committed report is what the file measures,
and it resolves as --gguf=docs. (That a split equals the whole model is shown on the tiny
model by tests/model/composition_test.py and, over processes, tests/bridge/e2e_test.py.)"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from ds4jax import build, cli
from ds4jax import data as shipped
from ds4jax.generate.loop import Generator
from ds4jax.runtime.sampling import SamplingParams
from ds4jax.testing.suite import CHUNK, CTX
from ds4jax.tokenizer import Tokenizer
from ds4jax.train import data

REPO = pathlib.Path(__file__).resolve().parents[2]


def corpus_share(text):
  words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
  known = data.corpus_words()
  return words, sum(w in known for w in words) / max(len(words), 1)


@pytest.mark.e2e
def test_generate_greedy_speaks_the_corpus(tiny_cache_dir):
  """The acceptance command: most generated words are words of the corpus."""
  env = dict(os.environ, DS4JAX_CACHE=tiny_cache_dir, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), "--gguf=docs",
                      "--prompt=The assert statement", "--nochat", "--max_new_tokens=64",
                      f"--ctx_size={CTX}", f"--prefill_chunk={CHUNK}", "--temperature=0"],
                     env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  words, share = corpus_share(p.stdout)
  assert len(words) >= 12 and share >= 0.6, (share, p.stdout)


@pytest.fixture(scope="module")
def docs():
  path = cli.resolve_gguf("docs")
  return path, Tokenizer.from_gguf(path)


def test_sampled_speaks_the_corpus(docs):
  path, tok = docs
  gen = Generator(build.local_backend(path, ctx_size=CTX, prefill_chunk=CHUNK, max_sessions=1),
                  tok)
  for seed in (0, 1):
    res = gen.generate("The assert statement", max_new_tokens=48, chat=False,
                       sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=seed))
    words, share = corpus_share(res.text)
    assert len(words) >= 8 and share >= 0.6, (share, res.text)


def test_report_matches_the_file(docs):
  """The committed report's numbers, recomputed from the shipped file: the held-out loss of the
  Q8_0 model through inference, and the unigram baseline it beats by over a nat."""
  from ds4jax.train import export
  path, tok = docs
  rep = json.loads(shipped.DOCS_REPORT.read_text())
  assert rep["command"].startswith("python scripts/train.py --config=configs/train_docs.py")
  assert rep["study"]["q8"]["bytes"] == os.path.getsize(path)
  assert tok.vocab_size == rep["config"]["model"]["vocab_size"]
  vocab = data.Vocab.from_gguf(path)
  corpus = data.Corpus.build(len(vocab.tokens), tuple(rep["held_out"]), vocab)
  seq_len = rep["config"]["seq_len"]
  inputs, targets = corpus.eval_windows(seq_len)
  assert targets.size == rep["eval_tokens"]
  unigram = corpus.unigram_nll(seq_len)
  assert unigram == pytest.approx(rep["unigram_heldout_loss"], rel=1e-9)
  loss = export.heldout_loss(path, inputs, targets)
  assert loss == pytest.approx(rep["study"]["q8"]["heldout_loss"], abs=1e-3)
  assert loss < unigram - 1.0


def test_missing_docs_model_is_a_one_line_error(monkeypatch, tmp_path):
  monkeypatch.setattr(shipped, "DOCS_GGUF", tmp_path / "nope.gguf")
  with pytest.raises(FileNotFoundError, match="scripts/train.py --config=configs/train_docs"):
    cli.resolve_gguf("docs")
