"""Losses against ``losses.npz`` (the authors' loss classes and pytorch_msssim 1.0.0, README §8),
the torch-exact bicubic resize against ``F.interpolate``, and properties of the texture loss's random
patch sampling, which no fixture can pin down.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, fixture_stems, load_fixture, nchw_to_nhwc
from cgn_jax import losses
from cgn_jax import patches
from parity import Fixture, ParityError, Rule, check_fixture

STEM = "losses"

# Inputs and configuration of losses.npz (re.fullmatch); every other array is an output of a rule.
INPUTS = [r"seed", r"mask|bg_mask|rec_[ab]|gram_in|patches\d*_in|ssim(_small)?_[xy]",
          r"maskloss_w[\d.]+_interval"]  # MaskLoss's default interval, stored beside its value


def _rules(z: Fixture) -> list[Rule]:
  """How the port computes each output family of ``losses.npz`` (README §8), in NCHW."""
  nhwc = lambda key: jnp.asarray(nchw_to_nhwc(z[key]))

  def mask_loss(m):
    interval = ((float(m[2]), float(m[3])) if m[2] else  # else the default, stored beside it
                tuple(float(v) for v in z.get(m.string + "_interval", (0.1, 0.9))))
    return losses.mask_loss(nhwc("mask"), float(m[1]), interval)  # per sample: shape [N]

  def patches_of(m):
    got = patches.get_all_patches(nhwc(m[1] + "_in"), (int(m[2]), int(m[3])), pad=m[4] == "pad")
    return np.asarray(got).transpose(0, 3, 1, 2)

  def ssim_small(m):
    sx, sy = nhwc("ssim_small_x"), nhwc("ssim_small_y")
    assert sx.shape[1] < 11 <= sx.shape[2], "the small case must have one axis shorter than the window"
    with pytest.warns(UserWarning, match="shorter than the 11-tap window"):
      return losses.ssim(sx, sy, 1.0)

  ssim_xy = lambda: (nhwc("ssim_x"), nhwc("ssim_y"))
  return [
      Rule(r"binary_w([\d.]+)", "losses/value",
           lambda m: jax.jit(losses.binary_loss, static_argnums=1)(nhwc("mask"), float(m[1]))),
      Rule(r"maskloss_w([\d.]+)(?:_interval_([\d.]+)_([\d.]+))?", "losses/value", mask_loss),
      Rule(r"backgroundloss_w([\d.]+)", "losses/value",
           lambda m: losses.background_loss(nhwc("bg_mask"), float(m[1]))),
      Rule(r"rec_(l[12])_w([\d.]+)", "losses/value",
           lambda m: losses.reconstruction_loss(nhwc("rec_a"), nhwc("rec_b"), float(m[2]), m[1])),
      Rule(r"(patches\d*)_(\d+)x(\d+)_(pad|nopad)", "losses/patches", patches_of),
      Rule(r"gram_out", "losses/gram", lambda m: losses.gram_matrix(nhwc("gram_in"))),
      Rule(r"ssim_win_1d", "losses/value", lambda m: losses.gaussian_window(11, 1.5)),
      Rule(r"ssim_module_dr1", "losses/value",
           lambda m: jax.jit(losses.ssim, static_argnums=2)(*ssim_xy(), 1.0)),
      Rule(r"ssim_loss_dr1", "losses/value", lambda m: jax.jit(losses.ssim_loss)(*ssim_xy())),
      Rule(r"ssim_fn_default_dr255", "losses/value", lambda m: losses.ssim(*ssim_xy())),  # data_range 255
      Rule(r"ssim_fn_dr1_per_image", "losses/value",
           lambda m: losses.ssim(*ssim_xy(), 1.0, size_average=False)),
      Rule(r"ssim_small_dr1", "losses/value", ssim_small),
  ]


def _check(arrays, stem: str = STEM) -> dict[str, float]:
  """Compares every array of ``arrays`` (the fixture or a subset of it) with the port."""
  z = Fixture(arrays, stem)
  return check_fixture(z, _rules(z), INPUTS, stem)


@pytest.fixture(scope="module")
def z(fixtures_dir):
  return load_fixture(fixtures_dir, STEM)


@pytest.mark.parametrize("stem", fixture_stems(STEM))
def test_fixture_parity(fixtures_dir, stem):
  """Every array of the fixture: BinaryLoss, MaskLoss, BackgroundLoss, ReconstructionLoss,
  get_all_patches, the gram matrix and pytorch_msssim's SSIM."""
  _check(load_fixture(fixtures_dir, stem), stem)


def test_reduced_fixture_is_checked_on_the_arrays_it_holds(z, tmp_path):
  keep = ("mask", "binary_w0.3", "maskloss_w500", "rec_a", "rec_b", "rec_l2_w100", "patches_in",
          "patches_2x2_pad")
  np.savez(tmp_path / f"{STEM}.npz", **{k: z[k] for k in keep})
  errors = _check(load_fixture(str(tmp_path), STEM))
  assert set(errors) == {"binary_w0.3", "maskloss_w500", "rec_l2_w100", "patches_2x2_pad"}
  # An output whose input is missing fails naming the input (not a KeyError) ...
  with pytest.raises(ParityError, match="lacks 'bg_mask'"):
    _check({**{k: z[k] for k in keep}, "backgroundloss_w2000": z["backgroundloss_w2000"]})
  # ... an unknown array fails before anything is computed, naming it ...
  with pytest.raises(ParityError, match="perceptual_w3"):
    _check({**{k: z[k] for k in keep}, "perceptual_w3": z["binary_w0.3"]})
  # ... and a wrong value names its key, error and tolerance.
  with pytest.raises(ParityError, match=r"losses:binary_w0\.3: max \|port - ref\| 0\.01 exceeds atol"):
    _check({**{k: z[k] for k in keep}, "binary_w0.3": z["binary_w0.3"] + np.float32(0.01)})


def test_binary_loss_has_no_epsilon():
  # As torch: 0 * log2(0) is nan, so an unclamped mask of exactly 0 or 1 poisons the loss.
  m = np.array([[0.0, 0.5], [0.25, 1.0]], np.float32).reshape(1, 2, 2, 1)
  ref = -torch.tensor(m) * torch.log2(torch.tensor(m)) - (1 - torch.tensor(m)) * torch.log2(1 - torch.tensor(m))
  assert np.isnan(float(losses.binary_loss(jnp.asarray(m), 1.0))) and bool(torch.isnan(ref.mean()))


def test_adversarial_mse_loss():
  v = np.random.default_rng(0).standard_normal((7, 1)).astype(np.float32)
  for real, target in ((True, 1.0), (False, 0.0)):
    ref = torch.nn.MSELoss()(torch.tensor(v), torch.full((7, 1), target)).item()
    assert_close(losses.adversarial_mse_loss(jnp.asarray(v), real), ref, atol=1e-6, name=f"real={real}")


def test_reconstruction_loss_rejects_unknown_kind():
  a = jnp.zeros((1, 2, 2, 3))
  with pytest.raises(ValueError, match="l3"):
    losses.reconstruction_loss(a, a, 1.0, "l3")


def test_ssim_gradient_reaches_the_generator(z):
  x, y = jnp.asarray(nchw_to_nhwc(z["ssim_x"])), jnp.asarray(nchw_to_nhwc(z["ssim_y"]))
  value_and_grad = jax.jit(jax.value_and_grad(losses.ssim_loss))
  for a, b in ((x, y), (x[:, :9], y[:, :9])):  # also with the smoothing skipped along H
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      _, g = value_and_grad(a, b)
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 1e-6
  # It is the derivative: a small step against it lowers the loss.
  value, g = value_and_grad(x, y)
  assert float(value_and_grad(x - 1e-3 * g / jnp.max(jnp.abs(g)), y)[0]) < float(value)


def test_mask_losses_are_differentiable():
  m = jnp.asarray(np.random.default_rng(0).uniform(0.01, 0.99, (3, 8, 8, 1)).astype(np.float32))

  def total(m):
    return (losses.binary_loss(m, 300.0) + losses.mask_loss(m * 0.1, 500.0).mean()
            + losses.background_loss(m, 2000.0).mean())

  g = jax.jit(jax.grad(total))(m)
  assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0


# ---------------------------------------------------------------------------------------------
# torch bicubic

@pytest.mark.parametrize("src,dst", [((256, 256), (128, 128)), ((90, 90), (256, 256)),
                                     ((90, 90), (64, 64)), ((7, 13), (20, 5)), ((16, 16), (16, 16)),
                                     ((3, 1), (8, 2)), ((33, 47), (100, 11))])
def test_resize_bicubic_matches_torch(src, dst):
  x = np.random.default_rng(sum(src + dst)).uniform(-1, 1, (2, 3) + src).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x), dst, mode="bicubic", align_corners=False).numpy()
  got = jax.jit(patches.resize_bicubic_torch, static_argnums=1)(jnp.asarray(nchw_to_nhwc(x)), dst)
  assert_close(np.asarray(got).transpose(0, 3, 1, 2), ref, atol=1e-6, name=f"{src}->{dst}")
  # jax.image.resize is a different kernel (Keys a=-0.5, antialiased): this is why ours exists.
  if src != dst:
    other = jax.image.resize(jnp.asarray(nchw_to_nhwc(x)), (2,) + dst + (3,), "bicubic")
    assert float(jnp.max(jnp.abs(other - got))) > 1e-3


# ---------------------------------------------------------------------------------------------
# Texture loss: random patch grids

def _texture_inputs(n=2, size=32, seed=0):
  """Images in [-1, 1] and masks with one bright blob per image at different places."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
  yy, xx = np.mgrid[:size, :size] / size
  centres = rng.uniform(0.25, 0.75, (n, 2))
  masks = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02) for cy, cx in centres])
  masks = masks + 1e-3 * rng.random(masks.shape)  # no exact ties between patch means
  return jnp.asarray(images), jnp.asarray(masks[..., None].astype(np.float32))


def _torch_reference(mask, images, positions, patch=15, top=100, n_up=6, work=128):
  """The authors' recipe written with torch ops, given our draws: (top-k sets, target grids)."""
  m = F.interpolate(torch.tensor(np.asarray(mask)).permute(0, 3, 1, 2), (work, work), mode="bicubic",
                    align_corners=False)
  p = F.interpolate(torch.tensor(np.asarray(images)).permute(0, 3, 1, 2), (work, work), mode="bicubic",
                    align_corners=False)
  means = m.unfold(2, patch, 1).unfold(3, patch, 1).mean((1, 4, 5)).flatten(1)  # [N, P] row-major
  all_p = p.unfold(2, patch, 1).unfold(3, patch, 1)  # [N, C, nh, nw, ph, pw]
  all_p = all_p.permute(0, 2, 3, 1, 4, 5).flatten(1, 2)  # [N, P, C, ph, pw]
  grids, tops = [], []
  for b in range(m.shape[0]):
    tops.append(set(torch.argsort(means[b])[-top:].tolist()))
    chosen = all_p[b, torch.as_tensor(np.array(positions[b]))]  # [n_up^2, C, ph, pw]
    grid = chosen.reshape(n_up, n_up, -1, patch, patch).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(1, -1, n_up * patch, n_up * patch)
    grids.append(F.interpolate(grid, tuple(images.shape[1:3]), mode="bicubic", align_corners=False))
  return means.numpy(), tops, torch.cat(grids).permute(0, 2, 3, 1).numpy()


_SAMPLE = jax.jit(patches.sample_texture_targets)  # one compilation shared by the tests below


def test_texture_patches_come_from_the_top_k_windows_and_match_torch():
  images, mask = _texture_inputs()
  targets, positions = _SAMPLE(jax.random.PRNGKey(3), mask, images)
  assert targets.shape == images.shape and positions.shape == (2, 36)
  means, tops, ref = _torch_reference(mask, images, positions)
  for b in range(2):
    kth = np.sort(means[b])[-100]
    for pos in np.asarray(positions[b]):
      # In the torch top-100 set, or tied with its smallest member within float noise.
      assert int(pos) in tops[b] or means[b, pos] >= kth - 1e-6, (b, int(pos))
  # Given the same draws, the target grids are the authors' (torch resize, unfold, grid, resize).
  assert_close(targets, ref, atol=1e-5, name="texture targets")


def test_texture_sampling_is_deterministic_and_uniform_over_the_top_k():
  images, mask = _texture_inputs()
  t1, p1 = _SAMPLE(jax.random.PRNGKey(0), mask, images)
  t2, p2 = _SAMPLE(jax.random.PRNGKey(0), mask, images)
  np.testing.assert_array_equal(p1, p2)
  np.testing.assert_array_equal(t1, t2)
  _, p3 = _SAMPLE(jax.random.PRNGKey(1), mask, images)
  assert not np.array_equal(p1, p3)
  assert not np.array_equal(p1[0], p1[1]), "each image needs its own draw"

  # Uniform over the whole top-100 set and never outside it: 60 x 36 draws hit all 100 positions
  # (a given one is missed with probability 0.99**2160 < 1e-9).
  means = np.asarray(patches.patch_means(patches.resize_bicubic_torch(mask, (128, 128)), (15, 15)))
  seen = [set(), set()]
  for key in jax.random.split(jax.random.PRNGKey(2), 60):
    pos = np.asarray(_SAMPLE(key, mask, images)[1])
    for b in range(2):
      seen[b].update(pos[b].tolist())
  for b in range(2):
    assert seen[b] == set(np.argsort(means[b])[-100:].tolist())


def test_patch_means_equal_mean_of_all_patches():
  x = jnp.asarray(np.random.default_rng(0).random((2, 12, 10, 2)).astype(np.float32))
  ref = patches.get_all_patches(x, (5, 4), pad=False).mean((1, 2, 3)).reshape(2, -1)
  assert_close(patches.patch_means(x, (5, 4)), ref, atol=1e-6, name="patch means")


def _toy_features(images, num_blocks):
  """A cheap stand-in for VGG with the same contract (4 hooked maps, halving resolution).

  The real extractor is covered by test_vgg_parity.py; here only the loss wiring matters.
  """
  feats, x = [], images
  for _ in range(num_blocks):
    x = jnp.tanh(jnp.concatenate([x, x * x], axis=-1)[..., :6] * 1.5)
    feats.append(x)
    x = x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, -1).mean((2, 4))
  return feats


def test_texture_loss_gradient_only_reaches_the_foreground():
  images, mask = _texture_inputs()
  fg = jnp.flip(images, axis=2)
  key = jax.random.PRNGKey(5)

  def loss(x_gt, m, foreground):
    return losses.texture_loss(_toy_features, key, x_gt, m, foreground)[0]

  @jax.jit
  def run(x_gt, m, foreground):
    # The texture loss is the style-only perceptual loss against the sampled grid, weights [0,5,5,0].
    targets, _ = patches.sample_texture_targets(key, m, x_gt)
    ref = losses.perceptual_loss(_toy_features, foreground, targets, (0, 0, 0, 0), (0, 5, 5, 0))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(x_gt, m, foreground), ref

  (value, (g_gt, g_mask, g_fg)), (ref_total, ref_terms) = run(images, mask, fg)
  assert np.isfinite(float(value)) and float(value) > 0
  assert float(jnp.max(jnp.abs(g_fg))) > 0 and np.all(np.isfinite(g_fg))
  assert float(jnp.max(jnp.abs(g_gt))) == 0.0 and float(jnp.max(jnp.abs(g_mask))) == 0.0  # detached
  assert_close(value, ref_total, atol=1e-6, rtol=1e-5, name="texture = perceptual(style [0,5,5,0])")
  assert float(ref_terms[5]) > 0 and float(ref_terms[4]) == 0.0 and float(ref_terms[7]) == 0.0


def test_gram_gradient_matches_autodiff_of_the_einsum():
  """gram_matrix has its own VJP (one product instead of two); autodiff of the plain einsum is
  the reference."""
  f = jax.random.normal(jax.random.key(0), (2, 3, 5, 7))
  w = jax.random.normal(jax.random.key(1), (2, 7, 7))

  def plain(x):
    n, h, wd, c = x.shape
    y = x.reshape(n, h * wd, c)
    return jnp.einsum("npc,npd->ncd", y, y, precision=jax.lax.Precision.HIGHEST) / (c * h * wd)

  ours = jax.grad(lambda x: jnp.sum(jnp.sin(losses.gram_matrix(x)) * w))(f)
  ref = jax.grad(lambda x: jnp.sum(jnp.sin(plain(x)) * w))(f)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
