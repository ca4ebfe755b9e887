"""A tiny, deterministic byte-level BPE vocabulary in the ds4 / GPT-2 GGUF convention.

Layout of the ids:

- 0..7: the special tokens ds4 requires (`SPECIAL_TOKENS`; BOS = 0, EOS = 1), type CONTROL;
- 8..263: the 256 GPT-2 byte tokens, **in byte order** (byte b is id `8 + b`, spelled with
  GPT-2's bytes-to-unicode map, so a space is `Ġ`);
- 264..V-1: merges, learned greedily on `CORPUS` (most frequent pair, ties broken by the
  smallest pair), then, once the corpus is exhausted, filled in a fixed order (an existing
  token followed by a lowercase letter) so any vocab size can be reached.

Merge rank = its index in `merges`; merge r creates token id 264 + r.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re

SPECIAL_TOKENS = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "｜DSML｜",
    "<｜▁pad▁｜>",
)
BOS_ID, EOS_ID = 0, 1
N_SPECIAL = len(SPECIAL_TOKENS)
BYTE_OFFSET = N_SPECIAL
MIN_VOCAB = N_SPECIAL + 256

# llama.cpp token types.
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3

# GPT-2-style pre-split for ASCII text: contractions, words with their leading space,
# single digits, punctuation runs, whitespace.
PRE_SPLIT = re.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model is a good model for a test, and
a test that runs in a second is a test that people run. The model reads the tokens of the
prompt, one layer after another, and writes the logits of the next token. When the work is
split across machines, the first machine owns the embedding and the first layers, the next
machine owns the middle layers, and the last machine owns the final layers and the head.
Each machine loads only the weights of its own layers, so a large model fits where no single
machine could hold it. The coordinator listens for workers; each worker dials in, says which
layers it owns, and then serves requests until the session ends. What is sent between the
machines is the hidden state of the hyper-connection streams for the new tokens, with a small
header that says its shape and its type. Nothing that a peer sends is ever executed.
Hello, world! How are you today? I am fine, thank you. What time is it? It is ten past nine.
Please write a short story about a cat who lives in a library and reads books at night.
Once upon a time there was a cat named Tom. Tom liked to sleep on the warm books near the
window, and at night he walked between the shelves and read the titles in the moonlight.
One night he found a book about the sea, and he read it until the sun came up again.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026. Code: def f(x): return x * 2 + 1
User: what is the capital of France? Assistant: The capital of France is Paris.
User: think step by step. Assistant: First, we read the question. Then we answer it.
"""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> tuple[str, ...]:
  """GPT-2's reversible byte -> printable unicode character map, indexed by byte."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  table, n = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + n)
      n += 1
  return tuple(table[b] for b in range(256))


@dataclasses.dataclass(frozen=True)
class TinyVocab:
  """The `tokenizer.ggml.*` contents: tokens, merges ("a b"), token types."""

  tokens: tuple[str, ...]
  merges: tuple[str, ...]
  token_type: tuple[int, ...]
  model: str = "gpt2"
  pre: str = "joyai-llm"
  bos_id: int = BOS_ID
  eos_id: int = EOS_ID


def _encode_word(word: str) -> tuple[str, ...]:
  b2u = bytes_to_unicode()
  return tuple(b2u[b] for b in word.encode("utf-8"))


def _learn_merges(corpus: str, n_merges: int) -> list[tuple[str, str]]:
  """Greedy BPE on the pre-split words of `corpus`; stops when no pair occurs twice."""
  counts = collections.Counter(_encode_word(w) for w in PRE_SPLIT.findall(corpus))
  words = dict(counts)
  merges: list[tuple[str, str]] = []
  while len(merges) < n_merges:
    pairs: collections.Counter = collections.Counter()
    for w, c in words.items():
      for a, b in zip(w, w[1:]):
        pairs[a, b] += c
    if not pairs:
      break
    best_count = max(pairs.values())
    if best_count < 2:
      break
    best = min(p for p, c in pairs.items() if c == best_count)
    merges.append(best)
    joined = best[0] + best[1]
    new_words = {}
    for w, c in words.items():
      out, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == best:
          out.append(joined)
          i += 2
        else:
          out.append(w[i])
          i += 1
      new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
    words = new_words
  return merges


@functools.lru_cache(maxsize=8)
def build_vocab(vocab_size: int) -> TinyVocab:
  """Builds the deterministic vocabulary of exactly `vocab_size` tokens."""
  if vocab_size < MIN_VOCAB:
    raise ValueError(
        f"vocab_size={vocab_size} is too small for the tiny vocab (need >= {MIN_VOCAB})")
  b2u = bytes_to_unicode()
  tokens = list(SPECIAL_TOKENS) + list(b2u)
  known = set(tokens)
  n_merges = vocab_size - len(tokens)
  merges = []
  for a, b in _learn_merges(CORPUS, n_merges):
    if a + b not in known:
      merges.append(f"{a} {b}")
      tokens.append(a + b)
      known.add(a + b)
  # Fill: extend existing tokens (in id order) by a lowercase letter, a fixed order.
  letters = [b2u[c] for c in range(ord("a"), ord("z") + 1)]
  i = BYTE_OFFSET
  while len(tokens) < vocab_size:
    base = tokens[i]
    for ch in letters:
      if len(tokens) >= vocab_size:
        break
      if base + ch not in known:
        merges.append(f"{base} {ch}")
        tokens.append(base + ch)
        known.add(base + ch)
    i += 1
  token_type = [TOKEN_CONTROL] * N_SPECIAL + [TOKEN_NORMAL] * (vocab_size - N_SPECIAL)
  return TinyVocab(tuple(tokens), tuple(merges), tuple(token_type))
