"""Layers whose gradients are hand-written must agree with autodiff of the plain op."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax.models import conv_dw
from cgn_jax.models.layers import Conv2d


@pytest.mark.parametrize("rule", conv_dw.RULES)
@pytest.mark.parametrize("k,stride,cin", [(5, 1, 3), (3, 2, 8), (3, 1, 4)])
def test_conv2d_gradients_match_lax(k, stride, cin, rule):
  """Every kernel-gradient rule gives autodiff's gradients of the plain conv (float noise only)."""
  x = jax.random.normal(jax.random.key(0), (8, 9, 9, cin))
  conv = Conv2d(6, k, stride, k // 2, dw_rule=rule)
  params = conv.init(jax.random.key(1), x)["params"]

  def reference(p, x):
    y = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), ((k // 2, k // 2),) * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.sin(y + p["bias"]))

  ours = lambda p, x: jnp.sum(jnp.sin(conv.apply({"params": p}, x)))
  np.testing.assert_allclose(ours(params, x), reference(params, x), rtol=1e-6)
  g_ours = jax.jit(jax.grad(ours, argnums=(0, 1)))(params, x)
  g_ref = jax.grad(reference, argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_conv_rule_is_measured_once_inside_a_traced_gradient_and_then_cached(tmp_path, monkeypatch):
  """"auto" times the candidates while the caller's gradient is being traced (in another thread,
  so nothing is staged into the caller's program), keeps the winner in the JSON cache, and a new
  process (an emptied memory) takes it from there without timing again."""
  monkeypatch.setattr(conv_dw, "_one_device", lambda: True)  # conftest simulates 4 devices
  monkeypatch.delenv(conv_dw.ENV_RULE, raising=False)
  monkeypatch.setenv(conv_dw.ENV_CACHE, str(tmp_path / "rules.json"))
  monkeypatch.setattr(conv_dw, "_choices", {})
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 16))  # above the not-worth-timing size
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  timed = []
  real_measure = conv_dw.measure
  monkeypatch.setattr(conv_dw, "measure", lambda *a, **k: timed.append(a) or real_measure(*a, **k))
  loss = lambda w: jnp.sum(jnp.sin(conv_dw.conv(x, w, 1, 1)))
  g = jax.jit(jax.grad(loss))(w)
  assert len(timed) == 1 and timed[0][0] == x.shape
  stored = json.loads((tmp_path / "rules.json").read_text())
  (key, rule), = stored.items()
  assert rule in conv_dw.candidates(8) and "x(8, 32, 32, 16)" in key
  ref = jax.grad(lambda w: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))))(w)
  # Each entry sums 8 * 32 * 32 products of O(1) terms: float32 rounding grows with that sum, not
  # with the entry, so an entry that cancels to ~1 carries the error of the ~100-sized ones (1.2e-4
  # seen under CI). The bound scales with the largest entry; a wrong rule is off by O(1) or more.
  np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(ref))))

  monkeypatch.setattr(conv_dw, "_choices", {})
  monkeypatch.setattr(conv_dw, "measure", lambda *a, **k: pytest.fail("measured twice"))
  assert conv_dw.choose(x.shape, w.shape, 1, 1, x.dtype) == rule
  jax.jit(loss)(w)  # forward only: nothing to choose


def test_conv_rule_pin_and_bad_rules(monkeypatch):
  monkeypatch.setenv(conv_dw.ENV_RULE, "batch4")
  assert conv_dw.choose((8, 9, 9, 3), (3, 3, 3, 4), 1, 1, jnp.float32) == "batch4"
  assert conv_dw.choose((6, 9, 9, 3), (3, 3, 3, 4), 1, 1, jnp.float32) == "xla"  # 4 does not divide 6
  monkeypatch.setenv(conv_dw.ENV_RULE, "fast")
  with pytest.raises(ValueError, match="CGN_CONV_DW=fast is not a rule"):
    conv_dw.choose((8, 9, 9, 3), (3, 3, 3, 4), 1, 1, jnp.float32)
  with pytest.raises(ValueError, match="does not apply to a batch of 6"):
    conv_dw.conv(jnp.zeros((6, 9, 9, 3)), jnp.zeros((3, 3, 3, 4)), 1, 1, "batch4")


@pytest.mark.parametrize("k,stride,padding,ceil_mode,size", [(3, 2, 1, False, 9), (2, 2, 0, True, 7),
                                                              (3, 2, 0, True, 8), (2, 2, 0, False, 6)])
def test_max_pool_matches_torch_values_and_gradient_with_ties(k, stride, padding, ceil_mode, size):
  """torch routes a window's whole gradient to its first maximum; ties (ReLU zeros, repeated
  values) are where a plain autodiff of ``maximum`` would split it instead."""
  torch = pytest.importorskip("torch")
  from cgn_jax.models.layers import max_pool_torch  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = np.maximum(rng.integers(-2, 3, (2, 3, size, size)), 0).astype(np.float32)  # many ties
  g = rng.normal(size=(2, 3) + (torch.nn.functional.max_pool2d(
      torch.zeros(1, 1, size, size), k, stride, padding, ceil_mode=ceil_mode).shape[-2:])).astype(
          np.float32)
  xt = torch.tensor(x, requires_grad=True)
  yt = torch.nn.functional.max_pool2d(xt, k, stride, padding, ceil_mode=ceil_mode)
  yt.backward(torch.tensor(g))

  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
  y, vjp = jax.vjp(lambda v: max_pool_torch(v, k, stride, padding, ceil_mode), nhwc(x))
  (dx,) = jax.jit(vjp)(nhwc(g))
  np.testing.assert_array_equal(np.asarray(y).transpose(0, 3, 1, 2), yt.detach().numpy())
  np.testing.assert_allclose(np.asarray(dx).transpose(0, 3, 1, 2), xt.grad.numpy(), atol=1e-6)
