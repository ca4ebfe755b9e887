"""The ds4 builders (issue 22 item 5; research/directions.py, research/expert_map.py,
scripts/build_direction.py, scripts/build_expert_map.py): the direction is the normalised
mean difference of the prompts' last rows (and its switches do what ds4's do), the expert map
marks the experts a count of the captured router_ids picks, both files load with the
readers, and the scripts give the library's result in one process and through a split."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ds4jax.research import Lab, directions, expert_map, prompt_sets
from ds4jax.runtime.edits import Interventions
from ds4jax.testing.suite import CHUNK, CTX

REPO = pathlib.Path(__file__).resolve().parents[2]
SHAPES = [f"--ctx_size={CTX}", f"--prefill_chunk={CHUNK}"]
TARGET = ["cats purr", "dogs bark"]
CONTRAST = ["tax law", "court case", "a third, unpaired line"]


@pytest.fixture(scope="module")
def lab(tiny_reference):
  """A Lab over the session's whole tiny model at the standard shapes (its own sessions)."""
  gen = tiny_reference.generator
  return Lab(gen.backend, gen.tokenizer)


def _chat_ids(lab, prompt):
  """ds4's rendering, written out: BOS, system, User tag, prompt, Assistant tag, </think>."""
  return lab.tokenizer.chat_prompt([("system", prompt_sets.DS4_SYSTEM), ("user", prompt)])


@pytest.fixture(scope="module")
def last_rows(lab):
  """Every prompt's ffn_out row at its last position, every layer, from a capture of all
  positions: {prompt: float64 [L, D]}."""
  out = {}
  for p in TARGET + CONTRAST[:2]:
    cap = lab.capture(_chat_ids(lab, p), "ffn_out", layers="all")
    assert len(cap.positions) == len(_chat_ids(lab, p))
    out[p] = np.stack([cap[f"ffn_out.{il}"][-1] for il in range(lab.cfg.n_layers)])
  return {k: v.astype(np.float64) for k, v in out.items()}


@pytest.fixture(scope="module")
def built(lab):
  return directions.build_direction(lab, TARGET, CONTRAST)


def _unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _rel_err(got, want):
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ---------------------------------------------------------------------------- directions
def test_direction_is_the_normalised_mean_difference_without_the_contrast_part(
    lab, last_rows, built):
  mt = np.mean([last_rows[p] for p in TARGET], axis=0)
  mc = np.mean([last_rows[p] for p in CONTRAST[:2]], axis=0)  # the unpaired line is cut
  d = _unit(mt - mc)
  base = _unit(mc)
  want = _unit(d - np.sum(d * base, axis=-1, keepdims=True) * base)
  assert built.dirs_LD.shape == (lab.cfg.n_layers, lab.cfg.d_model)
  assert built.dirs_LD.dtype == np.float32
  assert _rel_err(built.dirs_LD, want) < 1e-5
  np.testing.assert_allclose(np.linalg.norm(built.dirs_LD, axis=1), 1.0, atol=1e-6)
  assert np.abs(np.sum(built.dirs_LD * base, axis=1)).max() < 1e-6  # the part is gone
  # Without the removal: the plain normalised difference, which had a part along it.
  plain = directions.build_direction(lab, TARGET, CONTRAST, orthogonalize=False)
  assert _rel_err(plain.dirs_LD, d) < 1e-5
  assert np.abs(np.sum(plain.dirs_LD * base, axis=1)).min() > 1e-3


def test_pair_normalize_averages_the_normalised_pair_differences(lab, last_rows):
  pairs = [_unit(last_rows[t] - last_rows[c]) for t, c in zip(TARGET, CONTRAST)]
  want = _unit(np.mean(pairs, axis=0))
  got = directions.build_direction(lab, TARGET, CONTRAST, pair_normalize=True,
                                   orthogonalize=False)
  assert _rel_err(got.dirs_LD, want) < 1e-5
  assert got.meta["pair_normalize"] and not got.meta["orthogonalize_control_mean"]


def test_the_direction_file_has_ds4s_sidecar_and_loads_with_the_reader(lab, built, tmp_path):
  js, f32 = built.save(tmp_path / "out" / "d.json", good_file="g.txt", bad_file="b.txt",
                       model="m.gguf")
  assert (js.name, f32.name) == ("d.json", "d.f32")
  np.testing.assert_array_equal(np.fromfile(f32, "<f4").reshape(built.dirs_LD.shape),
                                built.dirs_LD)
  meta = json.loads(js.read_text())
  assert meta["format"] == "ds4-directional-steering-v1"
  assert meta["shape"] == [lab.cfg.n_layers, lab.cfg.d_model]
  assert (meta["component"], meta["thinking"], meta["pair_normalize"],
          meta["orthogonalize_control_mean"]) == ("ffn_out", False, False, True)
  assert (meta["good_file"], meta["bad_file"], meta["model"]) == ("g.txt", "b.txt", "m.gguf")
  assert meta["chat"] and meta["system"] == prompt_sets.DS4_SYSTEM and meta["pairs"] == 2
  steer = Interventions.ds4_steering(f32, lab.cfg, ffn=1.0, attn=0.5)
  assert len(steer.edits) == 2 * lab.cfg.n_layers


def test_direction_math_on_hand_vectors():
  """One layer, D = 3: means (2, 1, 0) and (1, 1, 0): the difference (1, 0, 0) loses its
  part along (1, 1, 0)/sqrt 2 and becomes (1, -1, 0)/sqrt 2; a zero row stays zero."""
  t, c = np.array([[2.0, 1, 0], [1, 1, 1]]), np.array([[1.0, 1, 0], [1, 1, 1]])
  d = directions.direction(t, c)
  np.testing.assert_allclose(d[0], np.array([1, -1, 0]) / np.sqrt(2), atol=1e-7)
  assert not np.any(d[1])
  np.testing.assert_allclose(directions.direction(t, c, orthogonalize=False)[0], [1, 0, 0])
  pair = directions.direction(t, c, pair_mean_LD=np.array([[0.0, 0, 2], [0, 0, 0]]),
                              orthogonalize=False)
  np.testing.assert_allclose(pair[0], [0, 0, 1])


# ---------------------------------------------------------------------------- expert maps
def test_the_expert_map_marks_the_experts_the_counts_pick(lab, tmp_path):
  """Risk differences counted by hand from the captured router_ids of every position of the
  routed layers: +1 on each one's largest positive one, -1 on its most negative; the hash
  layer's row is zero."""
  cfg = lab.cfg
  routed = list(range(cfg.n_hash_layers, cfg.n_layers))
  counts = {}
  for side, prompts in (("t", TARGET), ("c", CONTRAST[:2])):
    per_layer, rows = [{} for _ in range(cfg.n_layers)], 0
    for p in prompts:
      cap = lab.capture(_chat_ids(lab, p), "router_ids", layers=routed)
      rows += len(cap.positions)
      for il in routed:
        for e in cap[f"router_ids.{il}"].ravel().tolist():
          per_layer[il][e] = per_layer[il].get(e, 0) + 1
    counts[side] = (per_layer, rows)
  m = expert_map.build_expert_map(lab, TARGET, CONTRAST, activate=1, deactivate=1)
  (ct, rt), (cc, rc) = counts["t"], counts["c"]
  assert not m.map_LE[:cfg.n_hash_layers].any()
  for il in routed:
    rd = [ct[il].get(e, 0) / rt - cc[il].get(e, 0) / rc for e in range(cfg.n_experts)]
    want = np.zeros(cfg.n_experts, np.float32)
    up = max(range(cfg.n_experts), key=lambda e: (rd[e], e))
    down = min(range(cfg.n_experts), key=lambda e: (rd[e], e))
    want[up], want[down] = (rd[up] > 0) * 1.0, (rd[down] < 0) * -1.0
    np.testing.assert_array_equal(m.map_LE[il], want, err_msg=f"layer {il}")
  assert np.abs(m.map_LE[cfg.n_hash_layers:]).sum() > 0
  assert (m.meta["target_rows"], m.meta["contrast_rows"]) == (rt, rc)
  js, f32 = m.save(tmp_path / "e.json")
  meta = json.loads(js.read_text())
  assert meta["format"] == "ds4-expert-steering-v1"
  assert meta["shape"] == [cfg.n_layers, cfg.n_experts]
  assert meta["layers"] == list(range(cfg.n_hash_layers, cfg.n_layers))
  steer = Interventions.ds4_expert_steering(f32, cfg, scale=1.0)
  assert {e.layer for e in steer.edits} <= set(meta["layers"])


def test_expert_counts_of_the_last_tokens(lab):
  cfg = lab.cfg
  routed = expert_map.routed_layers(cfg)  # the map's capture: no new program
  counts, rows = expert_map.expert_counts(lab, TARGET[0], routed, focus_last_tokens=3)
  assert rows == 3
  assert counts.sum(axis=1).tolist() == [0 if cfg.is_hash_layer(il) else 3 * cfg.n_experts_used
                                         for il in range(cfg.n_layers)]


def test_marking_rule_ties_and_min_rd():
  rd = np.array([[0.5, 0.5, -0.2, -0.2, 0.05, 0.0],
                 [0.9, 0.8, 0.7, -0.9, 0.0, 0.0]])
  m, report = expert_map.mark_experts(rd, [0, 1], activate=1, deactivate=1, min_rd=0.1)
  assert m[0].tolist() == [0, 1, -1, 0, 0, 0]  # ties: larger id for +1, smaller for -1
  assert m[1].tolist() == [1, 0, 0, -1, 0, 0]
  assert report[0]["activate"] == [{"expert": 1, "rd": 0.5}]
  m, _ = expert_map.mark_experts(rd, [1], activate=5, deactivate=5, min_rd=0.75)
  assert not m[0].any() and m[1].tolist() == [1, 1, 0, -1, 0, 0]


def test_layer_lists(lab):
  cfg = lab.cfg
  assert expert_map.routed_layers(cfg) == (1, 2, 3)
  assert expert_map.routed_layers(cfg, "1-2") == expert_map.routed_layers(cfg, "1:2") == (1, 2)
  assert expert_map.routed_layers(cfg, "3,1") == (1, 3)
  with pytest.raises(ValueError, match="layer 0 routes by token hash"):
    expert_map.routed_layers(cfg, "0-3")
  with pytest.raises(ValueError, match="layer 9 is out of range"):
    expert_map.routed_layers(cfg, "9")


def test_prompt_files(tmp_path):
  p = tmp_path / "p.txt"
  p.write_text("# a comment\n  first prompt  \n\nsecond\n")
  assert prompt_sets.read_prompt_file(p) == ["first prompt", "second"]
  assert prompt_sets.paired(["a", "b", "c"], ["x", "y"]) == (["a", "b"], ["x", "y"])
  assert prompt_sets.paired(["a", "b", "c"], ["x", "y"], max_pairs=1) == (["a"], ["x"])
  (tmp_path / "e.txt").write_text("# nothing\n\n")
  with pytest.raises(ValueError, match="no prompts found"):
    prompt_sets.read_prompt_file(tmp_path / "e.txt")
  with pytest.raises(FileNotFoundError, match="prompt file not found"):
    prompt_sets.read_prompt_file(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------- scripts
@pytest.fixture(scope="module")
def env(tiny_cache_dir):
  e = dict(os.environ, DS4JAX_CACHE=tiny_cache_dir, JAX_PLATFORMS="cpu")
  e.pop("DS4JAX_KEY", None)
  return e


@pytest.fixture
def files(tmp_path):
  (tmp_path / "good.txt").write_text("# target\n" + "\n".join(TARGET) + "\n")
  (tmp_path / "bad.txt").write_text("\n".join(CONTRAST) + "\n")
  return [f"--good_file={tmp_path}/good.txt", f"--bad_file={tmp_path}/bad.txt"]


def _run(script, *args, env):
  return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=400)


def _one_line_error(p, pattern):
  lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert len(lines) == 1 and pattern in lines[0], p.stderr


@pytest.mark.e2e
def test_build_direction_script_in_one_process(env, files, tmp_path, tiny_gguf, built):
  """The script's file is the library's; generate.py's steering flags accept it (its
  steering check runs before its --layers check, which then stops it before any load)."""
  p = _run("build_direction.py", f"--gguf={tiny_gguf}", *files, f"--out={tmp_path}/d.json",
           *SHAPES, env=env)
  assert p.returncode == 0, p.stderr
  got = np.fromfile(tmp_path / "d.f32", "<f4").reshape(built.dirs_LD.shape)
  np.testing.assert_allclose(got, built.dirs_LD, atol=1e-6)
  meta = json.loads((tmp_path / "d.json").read_text())
  assert meta["model"] == tiny_gguf and meta["good_file"].endswith("good.txt")
  assert f"wrote {tmp_path}/d.f32" in p.stdout
  g = _run("generate.py", f"--gguf={tiny_gguf}", "--prompt=x", "--layers=0:1",
           f"--dir_steering_file={tmp_path}/d.f32", env=env)
  _one_line_error(g, "--layers=0:1 without --listen")


@pytest.mark.e2e
def test_build_expert_map_script_through_a_split(env, files, tmp_path, tiny_gguf, lab,
                                                 split_route):
  """The coordinator (0:1) and the session's worker (2:output) give the one-process map."""
  p = _run("build_expert_map.py", f"--gguf={tiny_gguf}", *files, f"--out={tmp_path}/e",
           "--activate_per_layer=1", "--deactivate_per_layer=1", "--layers=0:1",
           f"--listen={split_route.listen}", "--route_timeout=240", *SHAPES, env=env)
  assert p.returncode == 0, p.stderr + split_route.logs()
  assert "route: 0:1@local -> 2:output@127.0.0.1:" in p.stderr
  want = expert_map.build_expert_map(lab, TARGET, CONTRAST, activate=1, deactivate=1)
  got = np.fromfile(tmp_path / "e.f32", "<f4").reshape(want.map_LE.shape)
  np.testing.assert_array_equal(got, want.map_LE)
  meta = json.loads((tmp_path / "e.json").read_text())
  assert meta["target_file"].endswith("good.txt") and meta["layer_report"][0]["enabled"] is False
  g = _run("generate.py", f"--gguf={tiny_gguf}", "--prompt=x", "--layers=0:1",
           f"--expert_steering_file={tmp_path}/e.f32", "--expert_steering_scale=1", env=env)
  _one_line_error(g, "--layers=0:1 without --listen")


@pytest.mark.e2e
def test_bad_builder_input_is_a_one_line_error(env, files, tmp_path, tiny_gguf):
  (tmp_path / "empty.txt").write_text("# no prompts\n")
  out = f"--out={tmp_path}/x.json"
  cases = [
      ("build_direction.py", [f"--good_file={tmp_path}/nope.txt", files[1], out],
       "prompt file not found"),
      ("build_expert_map.py", [f"--good_file={tmp_path}/empty.txt", files[1], out],
       "no prompts found"),
      ("build_direction.py", [*files, out, "--component=hc_out"], "--component=hc_out"),
      ("build_expert_map.py", [*files, out, "--steer_layers=0:2"], "routes by token hash"),
      ("build_direction.py", files, "--out is required"),
  ]
  for script, args, pattern in cases:
    _one_line_error(_run(script, f"--gguf={tiny_gguf}", *args, env=env), pattern)
  assert not (tmp_path / "x.f32").exists()
