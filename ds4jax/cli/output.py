"""What the scripts print about a generation: the route, and the per-hop timing table."""

from __future__ import annotations


def visible(text: str) -> str:
  """Control characters as escapes, not raw bytes (a random model such as tiny prints them;
  a terminal would act on them)."""
  return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" if ord(c) < 256
                 else f"\\u{ord(c):04x}" for c in text)


def format_route(info: dict) -> str:
  """`route: 0:1@local -> 2:output@HOST:PORT` from a backend's `route_info()`."""
  stages = info.get("route", [])
  parts = [f"{s.get('layers', s.get('range', '?'))}@{s.get('host', '?')}" for s in stages]
  return "route: " + " -> ".join(parts)


def format_hop_table(hops: list[dict]) -> str:
  """A fixed-width per-hop table from `GenerationResult.hop_summary()`."""
  head = (f"{'stage':<12}{'host':<22}{'prefill ms':>11}{'decode ms/tok':>14}{'queue ms':>10}"
          f"{'KiB in':>9}{'KiB out':>9}")
  lines = [head, "-" * len(head)]
  for h in hops:
    per_tok = 1e3 * h["decode_s"] / h["decode_steps"] if h["decode_steps"] else 0.0
    lines.append(f"{h['stage']:<12}{h['host']:<22}{1e3 * h['prefill_s']:>11.1f}{per_tok:>14.2f}"
                 f"{1e3 * h['queue_s']:>10.1f}{h['bytes_in'] / 1024:>9.1f}"
                 f"{h['bytes_out'] / 1024:>9.1f}")
  return "\n".join(lines)
