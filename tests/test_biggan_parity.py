"""Parity of the Flax BigGAN-deep with the authors' PyTorch BigGAN, on every ``biggan_deep_*`` fixture.

Per fixture (its own test case; widths, batch and truncations read from the fixture):
* eval mode at every stored truncation: the statistics row the authors' float64 arithmetic selects
  (``eval_i_stat_coef/start``), the image (full, or crops / 4x-subsampled / channel sums), and the
  stored early activations (``dbg_*``) at 1e-5;
* the train-mode step: its image and the updated ``u``/``v`` of every spectral-norm layer;
* a traced truncation reproduces the static (Python float) model, and bf16 compute stays close to
  float32 (relative error).
Plus the in-graph truncation -> statistics-row selection against the Python float64 original on
many float32 values.

Tolerances (fixtures README): torch moves the 256x256 images by ~1e-4 between thread counts, so
images use 2e-3; the channel sums over H*W pixels use a mean error of 1e-4 per pixel.
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
from conftest import assert_close, fixture_stems, load_fixture

STEMS = fixture_stems("biggan_deep_")
IMG_ATOL = 2e-3
ACT_ATOL = 1e-5
SUM_MEAN_ATOL = 1e-4
ATTN_ATOL = 1e-3  # after the attention softmax torch-vs-torch noise is already ~1.3e-4


@functools.lru_cache(maxsize=None)
def _setup(fixtures_dir: str, stem: str):
  """(fixture, config, variables); cached so that the tests of one fixture share the work."""
  fx = load_fixture(fixtures_dir, stem)
  variables, cfg = convert_biggan(load_torch_state_dict(os.path.join(fixtures_dir, stem + ".pth")))
  cfg = BigGANConfig.from_dict(cfg)
  for field in ("channel_width", "z_dim", "num_classes", "n_stats", "attention_layer_position",
                "output_dim"):
    assert getattr(cfg, field) == int(fx[field]), f"converter inferred {field}={getattr(cfg, field)}"
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


def _check_image(out_nhwc, fx, prefix: str, atol: float = IMG_ATOL) -> None:
  """Compares against whatever the fixture stored for this run: full image, or crops/sub4/sums."""
  out = np.asarray(out_nhwc).transpose(0, 3, 1, 2)
  if f"{prefix}_out" in fx:
    assert_close(out, fx[f"{prefix}_out"], atol=atol, name=f"{prefix}_out")
    return
  c = fx[f"{prefix}_out_crop_tl"].shape[-1]
  assert_close(out[..., :c, :c], fx[f"{prefix}_out_crop_tl"], atol=atol, name=f"{prefix} crop_tl")
  assert_close(out[..., -c:, -c:], fx[f"{prefix}_out_crop_br"], atol=atol, name=f"{prefix} crop_br")
  assert_close(out[..., ::4, ::4], fx[f"{prefix}_out_sub4"], atol=atol, name=f"{prefix} sub4")
  hw = out.shape[2] * out.shape[3]
  out64 = out.astype(np.float64)
  assert_close(out64.sum((2, 3)), fx[f"{prefix}_out_chan_sum"], atol=SUM_MEAN_ATOL * hw,
               name=f"{prefix} chan_sum")
  assert_close(np.abs(out64).sum((2, 3)), fx[f"{prefix}_out_chan_abs_sum"],
               atol=SUM_MEAN_ATOL * hw, name=f"{prefix} chan_abs_sum")


@pytest.mark.parametrize("stem", STEMS)
def test_eval_every_truncation(fixtures_dir, stem):
  fx, cfg, variables = _setup(fixtures_dir, stem)
  fwd = _eval_fn(fixtures_dir, stem)
  debug = _debug_modules(cfg)
  checked_debug = 0
  for i, t in enumerate(np.asarray(fx["truncations"]).tolist()):
    assert float(fx[f"eval_{i}_truncation"]) == t
    sel = stat_selection(t, cfg.n_stats)
    coef = float(fx[f"eval_{i}_stat_coef"])
    assert sel.start == int(fx[f"eval_{i}_stat_start"]), f"t={t}: start {sel.start}"
    assert sel.coef == np.float32(coef) and sel.one_minus == np.float32(1 - coef), f"t={t}: coef"
    out, inter = fwd(variables, fx[f"eval_{i}_u"], fx["y_onehot"], sel)
    assert bool(fx["truncation_full_output"][i]) == (f"eval_{i}_out" in fx)
    _check_image(out, fx, f"eval_{i}")
    for key in fx:
      m = re.fullmatch(rf"eval_{i}_(dbg_\w+?)(_crop(\d+))?", key)
      if not m:
        continue
      got = np.asarray(inter[debug[m.group(1)]])
      got = got if got.ndim == 2 else got.transpose(0, 3, 1, 2)
      if m.group(3):
        got = got[..., :int(m.group(3)), :int(m.group(3))]
      atol = ATTN_ATOL if m.group(1).startswith("dbg_attn") else ACT_ATOL
      assert_close(got, fx[key], atol=atol, name=key)
      checked_debug += 1
  assert checked_debug == sum(k.startswith("eval_") and "_dbg_" in k for k in fx)


def _torch_key_to_path(key: str) -> tuple[tuple[str, ...], str]:
  """'generator.layers.3.bn_0.scale.weight_u' -> (('generator', 'layers_3', 'bn_0', 'scale'), 'u')."""
  mod, leaf = key.rsplit(".", 1)
  mod = re.sub(r"layers\.(\d+)", r"layers_\1", mod)
  return tuple(mod.split(".")), {"weight_u": "u", "weight_v": "v"}[leaf]


@pytest.mark.parametrize("stem", STEMS)
def test_train_step_updates_every_spectral_norm(fixtures_dir, stem):
  fx, cfg, variables = _setup(fixtures_dir, stem)
  model = BigGAN(cfg)
  t = float(fx["train_truncation"])
  fwd = jax.jit(lambda v, u, y: model.apply(v, u, y, t, train=True, mutable=["batch_stats"]))
  out, new_vars = fwd(variables, fx["train_u"], fx["y_onehot"])
  _check_image(out, fx, "train")
  after = {k[len("train_after/"):]: v for k, v in fx.items() if k.startswith("train_after/")}
  n_sn = sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
             if path[-1].key == "u")
  assert len(after) == 2 * n_sn, f"fixture has {len(after)} u/v entries for {n_sn} SN layers"
  for key, expected in after.items():
    path, leaf = _torch_key_to_path(key)
    node = new_vars["batch_stats"]
    for p in path:
      node = node[p]
    assert_close(node[leaf], expected, atol=ACT_ATOL, name=f"train_after/{key}")
  # The precomputed statistics are never updated, in train mode either.
  for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(new_vars["batch_stats"])[0],
                              jax.tree_util.tree_leaves(variables["batch_stats"])):
    if path[-1].key in ("running_means", "running_vars"):
      np.testing.assert_array_equal(np.asarray(new), old)


@pytest.mark.parametrize("stem", STEMS)
def test_traced_truncation_matches_static(fixtures_dir, stem):
  """One compiled function serves every truncation value and equals the Python-float selection."""
  fx, cfg, variables = _setup(fixtures_dir, stem)
  model = BigGAN(cfg)
  traced = jax.jit(lambda v, u, y, t: model.apply(v, u, y, t))
  u, y = fx["eval_1_u"], fx["y_onehot"]
  # float32-representable values, so that the Python float64 path sees the same number; 0.405
  # interpolates (coef ~0.25), 0.5 hits a row exactly, 0.28 is the (float32) surprising case.
  for t in (np.float32(0.405), np.float32(0.5), np.float32(0.28)):
    got = np.asarray(traced(variables, u, y, jnp.float32(t)))
    via_sel = np.asarray(_eval_fn(fixtures_dir, stem)(variables, u, y,
                                                       stat_selection(float(t), cfg.n_stats))[0])
    assert_close(got, via_sel, atol=1e-6, name=f"traced vs StatSelection t={t}")
  assert traced._cache_size() == 1  # pylint: disable=protected-access


def test_static_and_traced_row_selection_agree():
  """The static (Python float) branch of the row selection equals the traced weighted-row form,
  which the model tests above use; the static branch then needs no separate model compilation."""
  rows = np.random.default_rng(1).normal(size=(51, 37)).astype(np.float32)
  dyn_fn = jax.jit(lambda r, s: _select_rows(r, _row_weights(s, 51)))
  for t in (0.28, 0.4, 0.405, 0.5, 1.0, 0.0123, float(np.float32(0.405))):
    sel = stat_selection(t)
    static = np.asarray(_select_rows(jnp.asarray(rows), sel))
    dyn = dyn_fn(rows, sel)
    np.testing.assert_allclose(np.asarray(dyn), static, rtol=2e-7, atol=0, err_msg=f"t={t}")
    if sel.coef == 0:
      np.testing.assert_array_equal(static, rows[sel.start])


@pytest.mark.parametrize("stem", STEMS)
def test_bfloat16_close_to_float32(fixtures_dir, stem):
  fx, cfg, variables = _setup(fixtures_dir, stem)
  u, y = fx["eval_1_u"], fx["y_onehot"]
  t = float(fx["eval_1_truncation"])
  ref = np.asarray(_eval_fn(fixtures_dir, stem)(variables, u, y, stat_selection(t, cfg.n_stats))[0])
  bf = jax.jit(lambda v, u, y: BigGAN(cfg, dtype=jnp.bfloat16).apply(v, u, y, t))
  got = np.asarray(bf(variables, u, y), np.float64)
  assert got.dtype == np.float64 and np.all(np.isfinite(got))
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  # Each GenBlock's four bf16 convolutions add ~1% relative error (measured: 1% after the first
  # block, 10.6% at the w16 fixture's image after 12 blocks + attention); a broken cast gives ~100%.
  assert rel < 0.2, f"bf16 vs f32 relative L2 error {rel:.3g}"


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
