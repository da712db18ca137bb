"""Parity of the Flax BigGAN-deep with the authors' PyTorch BigGAN, on every ``biggan_deep_*`` fixture.

Per fixture (its own test case; widths, batch and truncations read from the fixture), every array
the fixture holds is compared (``parity.check_fixture``):
* eval mode at every stored truncation: the statistics row the authors' float64 arithmetic selects
  (``eval_i_stat_coef/start``), the image (full, or crops / subsampled / channel sums, whichever
  are stored) and the stored early activations (``dbg_*``);
* the train-mode step: its image and the updated ``u``/``v`` of the spectral-norm layers
  (``train_after/*``).
An array no rule below knows fails the test, naming it. Plus port-only checks: every spectral norm
steps in train mode and the statistics never move; a traced truncation reproduces the static
(Python float) model; bf16 compute stays close to float32; the in-graph truncation -> statistics-row
selection equals the Python float64 original on many float32 values.

Tolerances, each derived from the README's torch 1-vs-2-thread noise: ``parity.TOLERANCES``.
"""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax.models.biggan import (BigGAN, BigGANConfig, StatSelection, _row_weights, _select_rows,
                                   stat_selection, stat_selection_traced)
from converters.biggan import convert_biggan
from converters.common import load_torch_state_dict
from conftest import fixture_stems, load_fixture
from parity import TOLERANCES, Fixture, ParityError, Rule, check_fixture, compare

STEMS = fixture_stems("biggan_deep_")
CONFIG_FIELDS = ("channel_width", "z_dim", "num_classes", "n_stats", "attention_layer_position",
                 "output_dim")

# Keys that are inputs, random-draw records or configuration (re.fullmatch).
INPUTS = [
    r"seed|noise_seed",
    "|".join(CONFIG_FIELDS) + "|eps",  # the converter's inferred config is checked against these
    r"classes|y_onehot|truncnorm_base",
    r"truncations|truncation_full_output",
    r"sn_sigma_over_sigmamax_(min|max)",  # how the stored u/v were mixed: a fact about the weights
    r"eval_\d+_(truncation|u)", r"train_(truncation|u)",
]


@functools.lru_cache(maxsize=None)
def _setup(fixtures_dir: str, stem: str):
  """(fixture, config, variables); cached so that the tests of one fixture share the work."""
  fx = load_fixture(fixtures_dir, stem)
  variables, cfg = convert_biggan(load_torch_state_dict(os.path.join(fixtures_dir, stem + ".pth")))
  cfg = BigGANConfig.from_dict(cfg)
  for field in CONFIG_FIELDS:
    if field in fx:
      assert getattr(cfg, field) == int(fx[field]), f"converter inferred {field}={getattr(cfg, field)}"
  if "eps" in fx:
    assert cfg.eps == float(fx["eps"])
  return fx, cfg, variables


def _debug_modules(cfg: BigGANConfig) -> dict[str, str]:
  """Fixture debug name -> Flax module name whose output it is."""
  a = cfg.attention_layer_position
  return {"dbg_gen_z_linear": "gen_z", "dbg_layer0_out": "layers_0", "dbg_layer1_out": "layers_1",
          "dbg_attn_in": f"layers_{a - 1}", "dbg_attn_out": f"layers_{a}"}


@functools.lru_cache(maxsize=None)
def _eval_fn(fixtures_dir: str, stem: str):
  """One compilation for every truncation: the selection is passed in as data (StatSelection)."""
  _, cfg, _ = _setup(fixtures_dir, stem)
  model = BigGAN(cfg)
  names = set(_debug_modules(cfg).values())

  @jax.jit
  def fwd(variables, u, y, sel):
    out, st = model.apply(variables, u, y, sel,
                          capture_intermediates=lambda mdl, _: mdl.name in names)
    inter = st["intermediates"]["generator"]
    return out, {k: inter[k]["__call__"][0] for k in names}
  return fwd


@functools.lru_cache(maxsize=None)
def _train_fn(fixtures_dir: str, stem: str, truncation: float):
  _, cfg, _ = _setup(fixtures_dir, stem)
  model = BigGAN(cfg)
  return jax.jit(lambda v, u, y: model.apply(v, u, y, truncation, train=True, mutable=["batch_stats"]))


def _torch_key_to_path(key: str) -> tuple[tuple[str, ...], str]:
  """'generator.layers.3.bn_0.scale.weight_u' -> (('generator', 'layers_3', 'bn_0', 'scale'), 'u')."""
  mod, leaf = key.rsplit(".", 1)
  mod = re.sub(r"layers\.(\d+)", r"layers_\1", mod)
  return tuple(mod.split(".")), {"weight_u": "u", "weight_v": "v"}[leaf]


def _rules(fixtures_dir: str, stem: str, fx: Fixture) -> list[Rule]:
  """How each output family of a BigGAN fixture is computed by the port (fixture layout, NCHW)."""
  _, cfg, variables = _setup(fixtures_dir, stem)
  debug = _debug_modules(cfg)
  hw = cfg.output_dim ** 2  # the image is output_dim x output_dim

  def truncation(run: str) -> float:
    if run == "train":
      return float(fx["train_truncation"])
    i = int(run[len("eval_"):])
    if f"{run}_truncation" not in fx:
      return float(np.asarray(fx["truncations"])[i])
    t = float(fx[f"{run}_truncation"])
    if "truncations" in fx and float(np.asarray(fx["truncations"])[i]) != t:
      raise ParityError(f"{run}_truncation={t} but truncations[{i}]={fx['truncations'][i]}")
    return t

  @functools.cache
  def selection(run: str) -> StatSelection:
    return stat_selection(truncation(run), cfg.n_stats)

  @functools.cache
  def eval_run(run: str):
    out, inter = _eval_fn(fixtures_dir, stem)(variables, fx[f"{run}_u"], fx["y_onehot"], selection(run))
    return np.asarray(out).transpose(0, 3, 1, 2), inter

  @functools.cache
  def train_run():
    out, new = _train_fn(fixtures_dir, stem, truncation("train"))(variables, fx["train_u"], fx["y_onehot"])
    return np.asarray(out).transpose(0, 3, 1, 2), new["batch_stats"]

  def image(m) -> np.ndarray:
    return train_run()[0] if m["run"] == "train" else eval_run(m["run"])[0]

  def full_image(m):
    run = m["run"]
    if run != "train" and "truncation_full_output" in fx:
      if not bool(np.asarray(fx["truncation_full_output"])[int(run[len("eval_"):])]):
        raise ParityError(f"{m.string} is stored but truncation_full_output says it is not")
    return image(m)

  def crop(m):
    c = fx[m.string].shape[-1]
    out = image(m)
    return out[..., :c, :c] if m["corner"] == "tl" else out[..., -c:, -c:]

  def channel_mean(m):  # compared as a mean per pixel: the stored float64 sum / (H*W)
    out = image(m).astype(np.float64)
    return (np.abs(out) if m["abs"] else out).sum((2, 3)) / hw

  def stat_coef(m):
    sel, coef = selection(m[1]), float(fx[m.string])
    if sel.one_minus != np.float32(1 - coef):
      raise ParityError(f"{m.string}: one_minus {sel.one_minus} != float32(1 - {coef})")
    return sel.coef

  def activation(m):
    name = m["name"]
    if name not in debug:
      raise ParityError(f"{m.string}: no Flax module is mapped to debug output '{name}' "
                        f"(known: {sorted(debug)})")
    got = np.asarray(eval_run(m["run"])[1][debug[name]])
    got = got if got.ndim == 2 else got.transpose(0, 3, 1, 2)
    if m["crop"]:
      got = got[..., :int(m["crop"]), :int(m["crop"])]
    return got

  def sn_vector(m):
    try:
      path, leaf = _torch_key_to_path(m[1])
      node = train_run()[1]
      for p in path:
        node = node[p]
      return node[leaf]
    except KeyError:
      raise ParityError(f"{m.string}: the port has no spectral-norm vector at this path") from None

  run = r"(?P<run>eval_\d+|train)"
  dbg = r"(?P<run>eval_\d+)_(?P<name>dbg_{}\w*?)(?:_crop(?P<crop>\d+))?"
  return [
      Rule(r"(eval_\d+)_stat_start", "biggan/stat_selection", lambda m: selection(m[1]).start),
      Rule(r"(eval_\d+)_stat_coef", "biggan/stat_selection", stat_coef, expect=np.float32),
      Rule(rf"{run}_out", "biggan/image", full_image),
      Rule(rf"{run}_out_crop_(?P<corner>tl|br)", "biggan/image", crop),
      Rule(rf"{run}_out_sub(?P<step>\d+)", "biggan/image",
           lambda m: image(m)[..., ::int(m["step"]), ::int(m["step"])]),
      Rule(rf"{run}_out_chan(?P<abs>_abs)?_sum", "biggan/image_mean", channel_mean,
           expect=lambda e: np.asarray(e, np.float64) / hw),
      Rule(dbg.format("attn_"), "biggan/dbg_attn", activation),
      Rule(dbg.format(""), "biggan/dbg_early", activation),
      Rule(r"train_after/(.+\.weight_[uv])", "biggan/sn_uv", sn_vector),
  ]


def _check(fixtures_dir: str, stem: str, arrays, only=None) -> dict[str, float]:
  """Compares every array of ``arrays`` (the fixture or a subset of it) with the port."""
  fx = Fixture(arrays, stem)
  return check_fixture(fx, _rules(fixtures_dir, stem, fx), INPUTS, stem, only)


@pytest.mark.parametrize("stem", STEMS)
def test_fixture_parity(fixtures_dir, stem):
  fx, _, _ = _setup(fixtures_dir, stem)
  _check(fixtures_dir, stem, fx)


@pytest.mark.parametrize("stem", STEMS)
def test_reduced_fixture_is_checked_on_the_arrays_it_holds(fixtures_dir, tmp_path, stem):
  """A fixture file with a subset of the shared arrays: exactly those outputs are compared."""
  fx, _, _ = _setup(fixtures_dir, stem)
  if not all(k in fx for k in ("eval_0_out_crop_tl", "eval_1_dbg_layer0_out", "eval_3_stat_coef")):
    pytest.skip(f"{stem} lacks the arrays this test subsets")
  # No train arrays, no full image, no truncation scalars (eval_i_truncation comes from truncations).
  keep = ["y_onehot", "truncations", "eval_0_u", "eval_0_out_crop_tl", "eval_0_out_chan_sum",
          "eval_1_u", "eval_1_dbg_layer0_out", "eval_3_stat_coef", "eval_3_stat_start"]
  np.savez(tmp_path / f"{stem}.npz", **{k: fx[k] for k in keep})
  errors = _check(fixtures_dir, stem, load_fixture(str(tmp_path), stem))
  assert set(errors) == {"eval_0_out_crop_tl", "eval_0_out_chan_sum", "eval_1_dbg_layer0_out",
                         "eval_3_stat_coef", "eval_3_stat_start"}

  subset = {k: fx[k] for k in keep}
  with pytest.raises(ParityError, match="eval_0_out_crop_mid"):  # unknown: fails before computing
    _check(fixtures_dir, stem, {**subset, "eval_0_out_crop_mid": fx["eval_0_out_crop_tl"]})
  with pytest.raises(ParityError, match="dbg_layer9_out"):  # a debug output with no module mapped
    _check(fixtures_dir, stem, {**subset, "eval_1_dbg_layer9_out": fx["eval_1_dbg_layer0_out"]})
  with pytest.raises(ParityError, match="lacks 'eval_2_u'"):
    _check(fixtures_dir, stem, {**subset, "eval_2_out_sub4": fx["eval_0_out_sub4"]})


def _some_noise(fx) -> tuple[np.ndarray, float]:
  """A stored (u, truncation) pair for the port-only tests: the fully stored run if there is one."""
  runs = sorted({m[1] for k in fx if (m := re.fullmatch(r"eval_(\d+)_u", k))}, key=int)
  if not runs:
    pytest.skip("fixture stores no eval_i_u")
  i = next((r for r in runs if f"eval_{r}_out" in fx), runs[0])
  t = fx.get(f"eval_{i}_truncation", np.asarray(fx["truncations"])[int(i)])
  return fx[f"eval_{i}_u"], float(t)


@pytest.mark.parametrize("stem", STEMS)
def test_train_step_updates_every_spectral_norm(fixtures_dir, stem):
  """Port-only: one power iteration moves every u and v; the precomputed statistics never move.
  (The fixture's train_after/* values themselves are compared by test_fixture_parity.)"""
  fx, _, variables = _setup(fixtures_dir, stem)
  _, new_vars = _train_fn(fixtures_dir, stem, float(fx["train_truncation"]))(
      variables, fx["train_u"], fx["y_onehot"])
  n_sn = 0
  for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(new_vars["batch_stats"])[0],
                              jax.tree_util.tree_leaves(variables["batch_stats"])):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if path[-1].key in ("running_means", "running_vars"):
      np.testing.assert_array_equal(np.asarray(new), old, err_msg=name)
    elif path[-1].key in ("u", "v"):
      # The stored u/v are re-mixed random vectors (u != normalize(W v)), so one step moves each.
      assert not np.array_equal(np.asarray(new), old), f"{name} did not step in train mode"
      n_sn += path[-1].key == "u"
  after = sum(k.startswith("train_after/") and k.endswith(".weight_u") for k in fx)
  assert 0 < n_sn and after <= n_sn, f"fixture has {after} weight_u entries for {n_sn} SN layers"


@pytest.mark.parametrize("stem", STEMS)
def test_traced_truncation_matches_static(fixtures_dir, stem):
  """One compiled function serves every truncation value and equals the Python-float selection."""
  fx, cfg, variables = _setup(fixtures_dir, stem)
  model = BigGAN(cfg)
  traced = jax.jit(lambda v, u, y, t: model.apply(v, u, y, t))
  u, _ = _some_noise(fx)
  y = fx["y_onehot"]
  # float32-representable values, so that the Python float64 path sees the same number; 0.405
  # interpolates (coef ~0.25), 0.5 hits a row exactly, 0.28 is the (float32) surprising case.
  for t in (np.float32(0.405), np.float32(0.5), np.float32(0.28)):
    got = np.asarray(traced(variables, u, y, jnp.float32(t)))
    via_sel = np.asarray(_eval_fn(fixtures_dir, stem)(variables, u, y,
                                                       stat_selection(float(t), cfg.n_stats))[0])
    compare(got, via_sel, "self/biggan_traced_truncation", f"traced vs StatSelection t={t}")
  assert traced._cache_size() == 1  # pylint: disable=protected-access


def test_static_and_traced_row_selection_agree():
  """The static (Python float) branch of the row selection equals the traced weighted-row form,
  which the model tests above use; the static branch then needs no separate model compilation."""
  rows = np.random.default_rng(1).normal(size=(51, 37)).astype(np.float32)
  dyn_fn = jax.jit(lambda r, s: _select_rows(r, _row_weights(s, 51)))
  for t in (0.28, 0.4, 0.405, 0.5, 1.0, 0.0123, float(np.float32(0.405))):
    sel = stat_selection(t)
    static = np.asarray(_select_rows(jnp.asarray(rows), sel))
    compare(dyn_fn(rows, sel), static, "self/biggan_row_mix", f"row mix t={t}")
    if sel.coef == 0:
      np.testing.assert_array_equal(static, rows[sel.start])


@pytest.mark.parametrize("stem", STEMS)
def test_bfloat16_close_to_float32(fixtures_dir, stem):
  fx, cfg, variables = _setup(fixtures_dir, stem)
  u, t = _some_noise(fx)
  y = fx["y_onehot"]
  ref = np.asarray(_eval_fn(fixtures_dir, stem)(variables, u, y, stat_selection(t, cfg.n_stats))[0])
  bf = jax.jit(lambda v, u, y: BigGAN(cfg, dtype=jnp.bfloat16).apply(v, u, y, t))
  got = np.asarray(bf(variables, u, y), np.float64)
  assert got.dtype == np.float64 and np.all(np.isfinite(got))
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  bound = TOLERANCES["self/biggan_bf16_rel_l2"].atol  # measured 10.6%; see the table
  assert rel < bound, f"bf16 vs f32 relative L2 error {rel:.3g} >= {bound}"


def _reference_selection(ts: np.ndarray, n_stats: int) -> tuple[np.ndarray, ...]:
  """The authors' arithmetic, vectorised: float64 modf(t / (1/(n-1))), weights cast to float32."""
  coef, start = np.modf(ts.astype(np.float64) / (1.0 / (n_stats - 1)))
  return start.astype(np.int32), coef.astype(np.float32), (1.0 - coef).astype(np.float32)


def test_traced_selection_equals_python_float64():
  rng = np.random.default_rng(0)
  special = [np.float32(k / 50) for k in range(1, 51)] + [0.28, 0.405, 0.4, 1.0, 2.0**-7, 2.0**-29]
  special = np.asarray(special, np.float32)
  near = np.concatenate([np.nextafter(special, np.float32(0)), np.nextafter(special, np.float32(2))])
  bits = rng.integers(np.float32(2.0**-29).view(np.int32), np.float32(1.0).view(np.int32),
                      200_000, dtype=np.int32)
  ts = np.concatenate([special, near, bits.view(np.float32), rng.random(50_000, np.float32)])
  ts = ts[(ts > 0) & (ts <= 1) & (ts >= 2.0**-29)]
  got = jax.jit(jax.vmap(lambda t: tuple(stat_selection_traced(t, 51))))(ts)
  want = _reference_selection(ts, 51)
  for g, w, name in zip(got, want, StatSelection._fields):
    mismatch = np.flatnonzero(np.asarray(g) != w)
    assert mismatch.size == 0, (f"{name} differs at t={ts[mismatch[:5]]}: "
                                f"{np.asarray(g)[mismatch[:5]]} vs {w[mismatch[:5]]}")
  # The scalar path (used for Python floats) agrees with the vectorised reference as well.
  ref = _reference_selection(special[special <= 1], 51)
  for j, t in enumerate(special[special <= 1]):
    sel = stat_selection(float(t))
    assert (sel.start, sel.coef, sel.one_minus) == (ref[0][j], ref[1][j], ref[2][j]), f"t={t}"
