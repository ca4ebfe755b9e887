"""LocalAI's `PredictOptions` -> the prompt ids and a `GenerationJob` (docs/localai.md).

The prompt is tokenized here, in the gRPC process, so streamed replies can carry the prompt
token count from the first chunk, and TokenizeString counts exactly what Predict runs:

  * `Messages` with `UseTokenizerTemplate` (or with an empty `Prompt`): the ds4 chat format
    (`Tokenizer.chat_prompt`); `Metadata["enable_thinking"]` picks `<think>` over `</think>`;
  * else `Prompt`: BOS + its tokens, as `scripts/generate.py --nochat` does.

Sampling follows LocalAI's convention that 0 means unset: `Tokens` 0 -> the default length
(256, as ds4), `TopP` 0 -> 1 (off), `TopK` 0 -> off, `Temperature` 0 -> greedy; a negative
`Seed` draws a fresh one.
"""

from __future__ import annotations

import logging
import secrets

from ds4jax.runtime.sampling import SamplingParams
from ds4jax.serving.generation import GenerationJob

# LocalAI/OpenAI roles -> the ds4 chat format's (system, user, assistant).
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "user", "function": "user"}
_TRUE = ("1", "true", "yes", "on")
log = logging.getLogger("ds4jax.localai")
_warned: set[str] = set()


class RequestError(ValueError):
  """A PredictOptions the backend cannot run (INVALID_ARGUMENT); the message is one line."""


def chat_messages(req) -> list[tuple[str, str]]:
  """(role, text) pairs: leading system messages merged into one, roles mapped to ds4's."""
  out: list[tuple[str, str]] = []
  for m in req.Messages:
    role = _ROLES.get(m.role.strip().lower())
    if role is None:
      raise RequestError(f"ds4jax: unknown chat role {m.role!r} (expected system, user, "
                         "assistant or tool)")
    if role == "system" and out and out[-1][0] == "system":
      out[-1] = ("system", out[-1][1] + "\n\n" + m.content)
    elif role == "system" and out:
      raise RequestError("ds4jax: a system message must come before the other messages")
    else:
      out.append((role, m.content))
  return out


def prompt_ids(req, tokenizer, *, allow_empty: bool = False) -> list[int]:
  """The transcript a PredictOptions asks for (see the module docstring)."""
  if req.Messages and (req.UseTokenizerTemplate or not req.Prompt):
    thinking = str(req.Metadata.get("enable_thinking", "")).lower() in _TRUE
    try:
      return tokenizer.chat_prompt(chat_messages(req), thinking=thinking)
    except RequestError:
      raise
    except ValueError as e:
      raise RequestError(f"ds4jax: {e}") from None
  if not req.Prompt:
    if allow_empty:
      return []
    raise RequestError("ds4jax: PredictOptions.Prompt or .Messages must be set")
  return tokenizer.encode(req.Prompt, add_bos=True)


def sampling(req) -> SamplingParams:
  seed = int(req.Seed) if req.Seed >= 0 else secrets.randbelow(2**31)
  top_p = float(req.TopP) if 0.0 < req.TopP <= 1.0 else 1.0
  try:
    return SamplingParams(temperature=max(float(req.Temperature), 0.0),
                          top_k=max(int(req.TopK), 0), top_p=top_p, seed=seed)
  except ValueError as e:
    raise RequestError(f"ds4jax: {e}") from None


def build_job(req, tokenizer, *, ctx_size: int, default_max_tokens: int = 256
              ) -> tuple[GenerationJob, int]:
  """(job, prompt token count). The job's prompt is the token ids, so the model process runs
  exactly what was counted. Max tokens are capped to what the context still holds."""
  ids = prompt_ids(req, tokenizer)
  room = ctx_size - len(ids)
  if room < 1:
    raise RequestError(f"ds4jax: the prompt has {len(ids)} tokens, the context holds "
                       f"{ctx_size}")
  for field, on in (("MinP", req.MinP > 0), ("IgnoreEOS", getattr(req, "IgnoreEOS", False))):
    if on and field not in _warned:  # once per process: LocalAI may send them on every call
      _warned.add(field)
      log.warning("PredictOptions.%s is not supported by ds4jax and is ignored", field)
  want = int(req.Tokens) if req.Tokens > 0 else default_max_tokens
  job = GenerationJob(prompt=ids, messages=None, max_tokens=min(want, room),
                      sampling=sampling(req), stop=tuple(s for s in req.StopPrompts if s))
  return job, len(ids)
