"""scripts/bench_research.py at its smallest (tiny model, 2 decode tokens, one round): every
mode runs and the table has a finite rate for each. No timing assertions."""

import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_every_mode_runs_and_reports_a_rate(tiny_cache_dir):
  p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_research.py"), "--gguf=tiny",
                      "--decode=2", "--rounds=1", "--prompt_len=8",
                      f"--cache_dir={tiny_cache_dir}"],
                     capture_output=True, text=True, timeout=600, cwd=REPO)
  assert p.returncode == 0, p.stderr[-2000:]
  rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([-+\d.]+) % \|$", p.stdout, re.M)
  assert [r[0] for r in rows] == ["plain", "steering, every layer's ffn_out", "capture ffn_out.2",
                                  "capture router_ids, every layer"], p.stdout
  assert all(float(r[1]) > 0 for r in rows)
