"""Paired prompt files in, ds4 steering files out: what the direction and expert-map builders
share (ds4's `dir-steering/tools/build_*.py`; ../shared/docs/ds4-research-and-capacity.md
§1-2).

    target, contrast = prompt_sets.paired(read_prompt_file("good.txt"),
                                          read_prompt_file("bad.txt"))
    ids = prompt_sets.prompt_ids(lab, target[0], chat=None, system=DS4_SYSTEM)
    prompt_sets.write_ds4_file("out/dir.json", dirs_LD, {"format": ...})  # + out/dir.f32
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Sequence

import numpy as np

# ds4's builders render every prompt with this system text unless told otherwise.
DS4_SYSTEM = "You are a helpful assistant."


def read_prompt_file(path: str | os.PathLike) -> list[str]:
  """One prompt a line; blank lines and lines starting with `#` are skipped (stripped, as
  ds4 does). A missing file or one without prompts is a one-line error."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file not found: {path}")
  with open(path, encoding="utf-8") as f:
    prompts = [s for s in (line.strip() for line in f) if s and not s.startswith("#")]
  if not prompts:
    raise ValueError(f"{path}: no prompts found (one a line; # starts a comment)")
  return prompts


def paired(target: Sequence[str], contrast: Sequence[str],
           max_pairs: int = 0) -> tuple[list[str], list[str]]:
  """The first n prompts of each set, n = the shorter set's length (ds4 pairs them by line),
  at most `max_pairs` if that is > 0."""
  n = min(len(target), len(contrast))
  if max_pairs > 0:
    n = min(n, int(max_pairs))
  if n == 0:
    raise ValueError("the builders need at least one target and one contrast prompt")
  return list(target[:n]), list(contrast[:n])


def prompt_ids(lab, prompt: str, *, chat: bool | None = None, system: str | None = DS4_SYSTEM,
               thinking: bool = False) -> list[int]:
  """The ids `lab` runs for a prompt: ds4's chat format (BOS, system, User tag, prompt,
  Assistant tag, `<think>` or `</think>`) when `chat`, else BOS + text (no system);
  `chat=None` is the model's own default (`Tokenizer.chat_model`)."""
  if lab.tokenizer is None:
    raise ValueError("the builders render text prompts: give the Lab a tokenizer")
  if chat is None:
    chat = bool(lab.tokenizer.chat_model)
  return lab.tokens(prompt, chat=chat, system=(system or None) if chat else None,
                    thinking=thinking)


def output_paths(out: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  """(sidecar .json, data .f32) for `out`, either of them or a bare stem (ds4's `--out`
  names the JSON and puts the .f32 next to it)."""
  out = pathlib.Path(out)
  return out.with_suffix(".json"), out.with_suffix(".f32")


def write_ds4_file(out: str | os.PathLike, values: np.ndarray,
                   meta: dict) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes `values` (e.g. [L, D] or [L, E]) as flat little-endian float32 and `meta` as
  its JSON sidecar (`output_paths`), creating the folder; returns (json path, f32 path)."""
  js, f32 = output_paths(out)
  js.parent.mkdir(parents=True, exist_ok=True)
  np.ascontiguousarray(values, dtype="<f4").tofile(f32)
  js.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
  return js, f32


__all__ = ["DS4_SYSTEM", "output_paths", "paired", "prompt_ids", "read_prompt_file",
           "write_ds4_file"]


@dataclasses.dataclass
class Ds4File:
  """A built ds4 steering file: `values` float32 [L, X] (the flat file) and `meta` (its
  sidecar)."""

  values: np.ndarray
  meta: dict

  def save(self, out: str | os.PathLike, **meta):
    """Writes the .f32 and the .json sidecar (`output_paths`); `meta` adds sidecar fields
    (the prompt files, the model). Returns (json path, f32 path)."""
    return write_ds4_file(out, self.values, dict(self.meta, **meta))
