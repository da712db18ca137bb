"""Layers whose gradients are hand-written must agree with autodiff of the plain op."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax.models.layers import Conv2d


@pytest.mark.parametrize("k,stride,cin", [(5, 1, 3), (3, 2, 8), (3, 1, 4)])
def test_conv2d_gradients_match_lax(k, stride, cin):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, cin))
  conv = Conv2d(6, k, stride, k // 2)
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
