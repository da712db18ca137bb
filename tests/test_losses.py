"""Losses against ``losses.npz`` (the authors' loss classes and pytorch_msssim 1.0.0, README §8),
the torch-exact bicubic resize against ``F.interpolate``, and properties of the texture loss's random
patch sampling, which no fixture can pin down.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, load_fixture, nchw_to_nhwc
from cgn_jax import losses
from cgn_jax import patches

STEM = "losses"

# Every array of the fixture is claimed by exactly one of these patterns (see test_every_array_is_checked).
CHECKED = {
    r"binary_w[\d.]+": "test_binary_loss",
    r"maskloss_w[\d.]+(_interval_[\d.]+_[\d.]+)?": "test_mask_loss",
    r"backgroundloss_w[\d.]+": "test_background_loss",
    r"rec_l[12]_w[\d.]+": "test_reconstruction_loss",
    r"patches\d*_\d+x\d+_(pad|nopad)": "test_get_all_patches",
    r"gram_out": "test_gram_matrix",
    r"ssim_(module_dr1|loss_dr1|fn_default_dr255|fn_dr1_per_image|small_dr1|win_1d)": "test_ssim",
    # inputs and configuration, used by the tests above
    r"seed|mask|bg_mask|rec_[ab]|patches\d*_in|gram_in|ssim(_small)?_[xy]|maskloss_w[\d.]+_interval":
        "inputs",
}


@pytest.fixture(scope="module")
def z(fixtures_dir):
  return load_fixture(fixtures_dir, STEM)


def _keys(z, pattern):
  keys = [k for k in z if re.fullmatch(pattern, k)]
  assert keys, f"no key of {STEM}.npz matches {pattern}"
  return keys


def test_every_array_is_checked(z):
  for key in z:
    owners = [p for p in CHECKED if re.fullmatch(p, key)]
    assert len(owners) == 1, f"{STEM}.npz key '{key}' is claimed by {owners or 'no test'}"


def test_binary_loss(z):
  mask = nchw_to_nhwc(z["mask"])
  for key in _keys(z, r"binary_w[\d.]+"):
    w = float(key[len("binary_w"):])
    assert_close(jax.jit(losses.binary_loss, static_argnums=1)(mask, w), z[key],
                 atol=1e-5, rtol=1e-5, name=key)


def test_binary_loss_has_no_epsilon():
  # As torch: 0 * log2(0) is nan, so an unclamped mask of exactly 0 or 1 poisons the loss.
  m = np.array([[0.0, 0.5], [0.25, 1.0]], np.float32).reshape(1, 2, 2, 1)
  ref = -torch.tensor(m) * torch.log2(torch.tensor(m)) - (1 - torch.tensor(m)) * torch.log2(1 - torch.tensor(m))
  assert np.isnan(float(losses.binary_loss(jnp.asarray(m), 1.0))) and bool(torch.isnan(ref.mean()))


def test_mask_loss(z):
  mask = nchw_to_nhwc(z["mask"])
  for key in _keys(z, r"maskloss_w[\d.]+(_interval_[\d.]+_[\d.]+)?"):
    m = re.fullmatch(r"maskloss_w([\d.]+)(?:_interval_([\d.]+)_([\d.]+))?", key)
    w = float(m.group(1))
    if m.group(2):
      interval = (float(m.group(2)), float(m.group(3)))
    else:  # the default interval, stored beside the value
      interval = tuple(float(v) for v in z.get(key + "_interval", (0.1, 0.9)))
    got = losses.mask_loss(mask, w, interval)
    assert got.shape == (mask.shape[0],), "MaskLoss is per sample"
    assert_close(got, z[key], atol=1e-5, rtol=1e-5, name=key)


def test_background_loss(z):
  bg = nchw_to_nhwc(z["bg_mask"])
  for key in _keys(z, r"backgroundloss_w[\d.]+"):
    got = losses.background_loss(bg, float(key[len("backgroundloss_w"):]))
    assert got.shape == (bg.shape[0],), "BackgroundLoss is per sample"
    assert_close(got, z[key], atol=1e-5, rtol=1e-5, name=key)


def test_reconstruction_loss(z):
  a, b = nchw_to_nhwc(z["rec_a"]), nchw_to_nhwc(z["rec_b"])
  for key in _keys(z, r"rec_l[12]_w[\d.]+"):
    kind, w = key.split("_")[1], float(key.split("_w")[1])
    assert_close(losses.reconstruction_loss(a, b, w, kind), z[key], atol=1e-5, rtol=1e-5, name=key)
  with pytest.raises(ValueError, match="l3"):
    losses.reconstruction_loss(a, b, 1.0, "l3")


def test_adversarial_mse_loss():
  v = np.random.default_rng(0).standard_normal((7, 1)).astype(np.float32)
  for real, target in ((True, 1.0), (False, 0.0)):
    ref = torch.nn.MSELoss()(torch.tensor(v), torch.full((7, 1), target)).item()
    assert_close(losses.adversarial_mse_loss(jnp.asarray(v), real), ref, atol=1e-6, name=f"real={real}")


def test_get_all_patches(z):
  for key in _keys(z, r"patches\d*_\d+x\d+_(pad|nopad)"):
    m = re.fullmatch(r"(patches\d*)_(\d+)x(\d+)_(pad|nopad)", key)
    x = nchw_to_nhwc(z[m.group(1) + "_in"])
    got = patches.get_all_patches(jnp.asarray(x), (int(m.group(2)), int(m.group(3))),
                                  pad=m.group(4) == "pad")
    np.testing.assert_array_equal(np.asarray(got).transpose(0, 3, 1, 2), z[key], err_msg=key)


def test_gram_matrix(z):
  assert_close(losses.gram_matrix(jnp.asarray(nchw_to_nhwc(z["gram_in"]))), z["gram_out"],
               atol=1e-9, rtol=1e-5, name="gram_out")


def test_ssim(z):
  x, y = jnp.asarray(nchw_to_nhwc(z["ssim_x"])), jnp.asarray(nchw_to_nhwc(z["ssim_y"]))
  sx, sy = jnp.asarray(nchw_to_nhwc(z["ssim_small_x"])), jnp.asarray(nchw_to_nhwc(z["ssim_small_y"]))
  assert sx.shape[1] < 11 <= sx.shape[2], "the small case must have one axis shorter than the window"
  got = {
      "ssim_win_1d": losses.gaussian_window(11, 1.5),
      "ssim_module_dr1": jax.jit(losses.ssim, static_argnums=2)(x, y, 1.0),
      "ssim_loss_dr1": jax.jit(losses.ssim_loss)(x, y),
      "ssim_fn_default_dr255": losses.ssim(x, y),  # the package default data_range=255
      "ssim_fn_dr1_per_image": losses.ssim(x, y, 1.0, size_average=False),
  }
  with pytest.warns(UserWarning, match="shorter than the 11-tap window"):
    got["ssim_small_dr1"] = losses.ssim(sx, sy, 1.0)
  for key, value in got.items():
    assert_close(value, z[key], atol=1e-5, rtol=1e-5, name=key)


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
