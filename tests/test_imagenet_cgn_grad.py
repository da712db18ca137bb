"""The ImageNet CGN's gradient function and initialisation on the tiny config: gradient
accumulation equals one big batch, 4 devices equal 1, the total loss falls on a fixed batch, and
the authors' initialisation from converted parts (split from test_imagenet_cgn_train.py to run beside it)."""

import os

import jax
import numpy as np
import optax
import pytest

from cgn_jax import checkpoints, parallel
from cgn_jax.jobs import train_cgn_imagenet as job
from cgn_jax.models import imagenet_cgn, vgg
from cgn_jax.models.biggan import init_variables as init_biggan, set_spectral_vectors
from test_imagenet_cgn_train import _config, _flat


@pytest.fixture(scope="module")
def grad_setup(data_dir, tmp_path_factory):
  c = _config(data_dir)
  cfg = imagenet_cgn.config_from_fields(c.model)
  model = imagenet_cgn.ImagenetCGN(cfg)
  variables = job.initial_variables(c, cfg, str(tmp_path_factory.mktemp("init")))
  # Mechanisms unlike the target: with four equal generators x_gen - x_gt is rounding noise, and
  # the L1 gradient (the sign of that noise) would differ between any two batch layouts.
  u2 = {col: variables[col]["u2net"] for col in ("params", "batch_stats")}
  gt = {col: variables[col]["biggan_GT"] for col in ("params", "batch_stats")}
  variables = imagenet_cgn.assemble(gt, u2, {m: init_biggan(cfg.biggan, seed=10 + i)
                                             for i, m in enumerate(imagenet_cgn.MECHANISMS)})
  # Exact top singular vectors: a power iteration then leaves u/v (hence sigma) unchanged, so the
  # number of iterations (one per micro-batch) does not change the gradients being compared.
  variables = set_spectral_vectors(jax.tree.map(np.array, variables), iterations=0)
  params, frozen = imagenet_cgn.split_trainable(variables["params"])
  feats = vgg.load_features_fn("", "", jax.random.key(7))
  big = jax.jit(job.make_grad_fn(c, model, feats, micro_batch_size=4, accum_steps=1))
  return c, model, feats, params, frozen, variables["batch_stats"], big


def test_gradient_accumulation_equals_one_big_batch(grad_setup):
  c, model, feats, params, frozen, stats, big = grad_setup
  key = jax.random.key(3)
  g1, _, t1 = big(params, stats, frozen, key)
  small = jax.jit(job.make_grad_fn(c, model, feats, micro_batch_size=2, accum_steps=2))
  g2, _, t2 = small(params, stats, frozen, key)
  for n in job.LOSS_NAMES:
    assert float(t2[n]) == pytest.approx(float(t1[n]), rel=1e-5, abs=1e-6 * float(t1["total"])), n
  # Per mechanism, the relative distance of the two whole gradients. It is not zero: the batch
  # layouts round differently, and a ReLU/clamp input within rounding of its kink flips its
  # derivative (measured: 1e-5 to 4e-4, concentrated in one example's embedding row). A wrong
  # accumulation (a micro-batch dropped or counted twice, the sum not averaged) is off by O(0.1-1).
  for m in imagenet_cgn.MECHANISMS:
    a = np.concatenate([v.ravel() for v in _flat(g1[m]).values()])
    b = np.concatenate([v.ravel() for v in _flat(g2[m]).values()])
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    print(f"{m}: relative gradient distance {rel:.2e}")
    assert rel < 2e-3, (m, rel)


def test_one_and_four_devices_give_the_same_gradient(grad_setup):
  """On the 4-device mesh each device draws and runs its own rows, and the BigGANs' batch norm
  takes its statistics over all of them: the gradient and the losses of the 1-device function."""
  c, model, feats, params, frozen, stats, big = grad_setup
  assert jax.device_count() == 4  # conftest
  mesh = parallel.create_mesh()
  four = jax.jit(job.make_grad_fn(c, model, feats, mesh, micro_batch_size=4, accum_steps=1))
  key = jax.random.key(5)
  g1, _, t1 = big(params, stats, frozen, key)
  g4, _, t4 = four(*parallel.replicate((params, stats, frozen), mesh), key)
  for n in job.LOSS_NAMES:
    assert float(t4[n]) == pytest.approx(float(t1[n]), rel=2e-4, abs=1e-5), n
  for m in imagenet_cgn.MECHANISMS:  # the accumulation test's rounding-noise bound
    a = np.concatenate([v.ravel() for v in _flat(g1[m]).values()])
    b = np.concatenate([v.ravel() for v in _flat(g4[m]).values()])
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    print(f"{m}: relative gradient distance {rel:.2e}")
    assert rel < 2e-3, (m, rel)


def test_total_loss_falls_on_a_fixed_batch(grad_setup):
  c, model, feats, params, frozen, stats, big = grad_setup
  tx = optax.adam(1e-3)
  opt = tx.init(params)
  update = jax.jit(lambda g, o, p: (lambda u, o2: (optax.apply_updates(p, u), o2))(*tx.update(g, o, p)))
  key = jax.random.key(11)  # the same key every step: the same samples, classes and patches
  totals = []
  for _ in range(25):
    g, stats, terms = big(params, stats, frozen, key)
    totals.append(float(terms["total"]))
    params, opt = update(g, opt, params)
  assert np.all(np.isfinite(totals))
  # Measured on the 3-block tiny layout: 1289 -> 1172 in 25 Adam steps (the background term, ~75 %
  # of the total, falls slowest); a gradient that misses a term or has the wrong sign does not fall.
  assert np.mean(totals[-3:]) < 0.95 * totals[0], totals


def test_initialisation_from_converted_parts_and_clear_errors(fixtures_dir, data_dir, tmp_path):
  """The authors' initialisation: all four generators from one BigGAN, plus the U2-Net; a missing
  or mismatching checkpoint is a one-line error that says what to run."""
  from converters.biggan import convert_biggan
  from converters.common import load_torch_state_dict
  gan_pth = os.path.join(fixtures_dir, "biggan_deep_w16.pth")
  c = _config(data_dir, **{"allow_random_init": False, "biggan_checkpoint": gan_pth,
                           "u2net_checkpoint": os.path.join(fixtures_dir, "u2netp.pth"),
                           "model.output_dim": 256, "model.channel_width": 16, "model.layers": (),
                           "model.attention_layer_position": 8})
  variables = job.initial_variables(c, imagenet_cgn.config_from_fields(c.model), str(tmp_path))
  expected, _ = convert_biggan(load_torch_state_dict(gan_pth))
  want = _flat(expected["params"])
  for name in ("biggan_GT",) + imagenet_cgn.MECHANISMS:
    got = _flat(variables["params"][name])
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}{k}")
  assert set(variables["params"]["u2net"]) >= {"stage1", "outconv"}

  wrong = _config(data_dir, **{"allow_random_init": False, "biggan_checkpoint": gan_pth})
  with pytest.raises(checkpoints.CheckpointError, match="different BigGAN"):
    job.initial_variables(wrong, imagenet_cgn.config_from_fields(wrong.model), str(tmp_path))
  empty = _config(data_dir, **{"allow_random_init": False})
  with pytest.raises(FileNotFoundError, match="python -m converters biggan"):
    job.initial_variables(empty, imagenet_cgn.config_from_fields(empty.model), str(tmp_path))
