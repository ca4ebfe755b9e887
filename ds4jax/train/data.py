"""The corpus, its tokenizer and the training windows.

The corpus is the English text that ships with Python: the help topics of
`pydoc_data.topics` (79 topics, about 465 KB on 3.11), read from the installed stdlib at run
time. A few topics are held out for evaluation; they were picked because none of their lines
appears in another topic (several topics repeat the text of others: `for` is a section of
`compound`, `naming` of `execmodel`).

The tokenizer is a byte-level BPE trained with HF `tokenizers` on the training topics, with
ds4's pre-split (`tokenizer.SPLIT_PATTERNS`) and ds4's special tokens at ids 0..7 (BOS 0,
EOS 1), so the ds4 `Tokenizer` rebuilt from the GGUF encodes exactly as the trained one and
the chat format still works.

A document is `BOS text EOS`; the documents are concatenated into one stream. A training
window is BOS followed by T-1 tokens of the stream, and its targets are those tokens and the
next one, so every window starts at position 0 with BOS, as a prompt does at inference.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np
import tokenizers
from gguf import GGUFValueType as VT
from tokenizers import Regex, pre_tokenizers, trainers

from ds4jax.tokenizer.tiny_vocab import SPECIAL_TOKENS, TOKEN_CONTROL, TOKEN_NORMAL
from ds4jax.tokenizer.tokenizer import SPLIT_PATTERNS, Tokenizer

# No line of these topics occurs in any other topic (about 4.5% of the text).
HELD_OUT = ("binary", "dict", "global", "import", "lambda", "objects")


def topics() -> dict[str, str]:
  """{topic: text} of the installed Python's `pydoc_data.topics`, sorted by topic."""
  from pydoc_data import topics as pydoc_topics  # the stdlib's copy, never one of ours
  return {k: pydoc_topics.topics[k] for k in sorted(pydoc_topics.topics)}


def split_topics(held_out: Sequence[str] = HELD_OUT) -> tuple[dict[str, str], dict[str, str]]:
  """(train, eval) topic dicts; an unknown held-out topic is an error."""
  all_topics = topics()
  missing = [k for k in held_out if k not in all_topics]
  if missing:
    raise ValueError(f"held-out topics not in pydoc_data.topics: {', '.join(missing)}")
  train = {k: v for k, v in all_topics.items() if k not in held_out}
  return train, {k: all_topics[k] for k in held_out}


def corpus_words(texts: Sequence[str] | None = None) -> frozenset[str]:
  """The lowercased alphabetic words of the texts (default: every topic)."""
  import re
  texts = list(topics().values()) if texts is None else texts
  return frozenset(w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t))


@dataclasses.dataclass(frozen=True)
class Vocab:
  """A trained vocabulary as the GGUF stores it: tokens in id order, merges 'a b'."""

  tokens: tuple[str, ...]
  merges: tuple[str, ...]

  @property
  def token_type(self) -> tuple[int, ...]:
    n = len(SPECIAL_TOKENS)
    return (TOKEN_CONTROL,) * n + (TOKEN_NORMAL,) * (len(self.tokens) - n)

  def gguf_metadata(self) -> dict:
    """The `tokenizer.ggml.*` keys (`gguf.writer.write_gguf(tokenizer=...)`)."""
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "joyai-llm",
        "tokenizer.ggml.tokens": list(self.tokens),
        "tokenizer.ggml.merges": list(self.merges),
        "tokenizer.ggml.token_type": (list(self.token_type), VT.INT32),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }

  def tokenizer(self) -> Tokenizer:
    return Tokenizer.from_vocab(self.tokens, self.merges, self.token_type)

  def to_json(self) -> str:
    return json.dumps({"tokens": list(self.tokens), "merges": list(self.merges)})

  @classmethod
  def from_gguf(cls, path: str) -> "Vocab":
    """The vocab stored in a GGUF's `tokenizer.ggml.tokens` / `merges`."""
    from ds4jax.gguf.lean import LeanReader
    from ds4jax.tokenizer.tokenizer import _string_array
    reader = LeanReader(path, "r")
    return cls(tuple(_string_array(reader, "tokenizer.ggml.tokens", path)),
               tuple(_string_array(reader, "tokenizer.ggml.merges", path)))

  @classmethod
  def from_json(cls, text: str) -> "Vocab":
    d = json.loads(text)
    return cls(tuple(d["tokens"]), tuple(d["merges"]))


def train_vocab(texts: Sequence[str], vocab_size: int) -> Vocab:
  """Byte-level BPE with ds4's pre-split; ids 0..7 are ds4's special tokens, then the 256
  byte tokens and the merges (HF's trainer is deterministic for a given input)."""
  if vocab_size < len(SPECIAL_TOKENS) + 256:
    raise ValueError(f"vocab_size={vocab_size} is below {len(SPECIAL_TOKENS) + 256} "
                     "(the special and byte tokens)")
  hf = tokenizers.Tokenizer(tokenizers.models.BPE())
  hf.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in SPLIT_PATTERNS]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  hf.train_from_iterator(list(texts), trainer)
  vocab = hf.get_vocab()
  if len(vocab) != vocab_size:
    raise ValueError(f"the corpus yields only {len(vocab)} tokens, asked for {vocab_size}")
  tokens = tuple(sorted(vocab, key=vocab.get))
  if tokens[:len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
    raise AssertionError("the trainer did not put the special tokens first")
  merges = json.loads(hf.to_str())["model"]["merges"]
  merges = tuple(m if isinstance(m, str) else " ".join(m) for m in merges)
  return Vocab(tokens, merges)


def encode_stream(tok: Tokenizer, texts: Sequence[str]) -> np.ndarray:
  """`BOS text EOS` per document, concatenated: int32 [n]."""
  ids: list[int] = []
  for t in texts:
    ids += [tok.bos_id] + tok.encode(t) + [tok.eos_id]
  return np.asarray(ids, np.int32)


def windows(stream: np.ndarray, seq_len: int, *, offset: int = 0, bos_id: int = 0):
  """Non-overlapping windows of `stream[offset:]`.

  Returns:
    (inputs int32 [n, T], targets int32 [n, T]): inputs = BOS + stream[j : j+T-1],
    targets = stream[j : j+T], j = offset + i*T.
  """
  n = (len(stream) - offset - 1) // seq_len
  if n < 1:
    raise ValueError(f"a stream of {len(stream)} tokens holds no window of {seq_len}")
  tgt = stream[offset:offset + n * seq_len].reshape(n, seq_len)
  inp = np.concatenate([np.full((n, 1), bos_id, np.int32), tgt[:, :-1]], axis=1)
  return inp.astype(np.int32), tgt.astype(np.int32)


@dataclasses.dataclass
class Corpus:
  """Tokenised train and eval streams plus the vocab (see the module docstring)."""

  vocab: Vocab
  train: np.ndarray
  eval: np.ndarray

  @classmethod
  def build(cls, vocab_size: int, held_out: Sequence[str] = HELD_OUT,
            vocab: Vocab | None = None) -> "Corpus":
    train_t, eval_t = split_topics(held_out)
    vocab = vocab or train_vocab(list(train_t.values()), vocab_size)
    tok = vocab.tokenizer()
    return cls(vocab, encode_stream(tok, list(train_t.values())),
               encode_stream(tok, list(eval_t.values())))

  def eval_windows(self, seq_len: int):
    """The held-out windows (offset 0, in order): (inputs, targets) int32 [n, T]."""
    return windows(self.eval, seq_len)

  def epoch_windows(self, seq_len: int, seed: int, epoch: int):
    """The training windows of one epoch, shuffled: a random start offset in [0, T) and a
    random order, both from (seed, epoch). Every epoch has the same number of windows."""
    rng = np.random.default_rng([seed, epoch])
    offset = int(rng.integers(0, seq_len))
    inp, tgt = windows(self.train, seq_len, offset=offset)
    n = (len(self.train) - seq_len - 1) // seq_len  # the count at the largest offset
    order = rng.permutation(len(inp))[:n]
    return inp[order], tgt[order]

  def unigram_nll(self, seq_len: int) -> float:
    """Cross-entropy (nats/token) of the eval windows' targets under the train stream's
    add-one smoothed unigram distribution: the baseline a model has to beat."""
    v = len(self.vocab.tokens)
    counts = np.bincount(self.train, minlength=v).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    _, tgt = windows(self.eval, seq_len)
    return float(-logp[tgt.reshape(-1)].mean())
