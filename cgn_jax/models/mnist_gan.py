"""The class-conditional GAN baseline of the MNIST table (paper Table 2, row "GAN"), in Flax.

The CGN paper publishes no code or architecture for its GAN baseline; the [Re] study
(ddgoede/Re-CGN, ``mnists/models/generator.py::GenConv``, trained by ``mnists/train_gan.py``)
filled the gap with a DCGAN generator, and this file follows that one:

* input ``[u, label_emb(y)]`` (noise first, an ``n_classes``-dim embedding second, as the CGN),
  seen as a 1x1 map;
* four transposed 4x4 convolutions without bias, 1 -> 4 -> 8 -> 16 -> 32 pixels, with
  ``8, 4, 2`` x ``ngf`` channels and 3 at the end; BatchNorm + LeakyReLU(0.2) after the first
  three, tanh at the end;
* torch's default initialisation (GenConv is not passed through ``init_net``): kernels
  U(+-1/sqrt(fan_in)) with torch's fan of a transposed conv (``out_channels * k * k``), BN weight 1,
  bias 0, embedding N(0, 1).

Deviation: ``ngf`` defaults to 28, not GenConv's 32, so that the generator has the capacity of the
CGN's generator (the three mechanisms and the label embedding of ``MnistCGN``): 655,860 against
659,992 trainable parameters (-0.6 %); GenConv's ngf 32 has 831,460 (+26 %).
``tests/test_mnist_gan.py`` computes both counts. The discriminator is the CGN's ``DiscLin``, as in
[Re]'s cfg (``MODEL.DISC: linear`` for all three variants).

Kernels are stored HWIO with torch's (in, out, kh, kw) entries at the same (kh, kw), so a converter
of [Re]'s ``ckp.pth`` would be a plain transpose; the spatial flip of a transposed convolution is
done in the forward pass.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cgn_jax import checkpoints
from cgn_jax.models import conv_dw
from cgn_jax.models import init as inits
from cgn_jax.models import loading
from cgn_jax.models.layers import TorchBatchNorm, leaky_relu

Array = jax.Array
FAMILY = "mnist_gan"
IMG_SZ = 32  # fixed by the four transposed convs (1 -> 4 -> 8 -> 16 -> 32)


def conv_transpose_torch(x: Array, kernel: Array, stride: int, padding: int) -> Array:
  """torch ``conv_transpose2d`` (no bias, groups 1) of an NHWC batch; ``kernel`` HWIO, with torch's
  (in, out, kh, kw) entry at (kh, kw).

  The two shapes of this generator take fast paths, because in the textbook form (the
  stride-dilated input, padded by ``k-1-padding``, convolved with the spatially flipped kernel;
  used for anything else) most taps multiply inserted zeros: a 1x1 input (the first layer) is one
  matrix product, and k4/s2/p1 runs by sub-pixel phases.
  """
  k = kernel.shape[0]
  h, w = x.shape[1:3]
  if h == w == 1 and stride == 1 and padding == 0:  # out[kh, kw] = x . kernel[kh, kw]
    return jnp.einsum("nc,hwco->nhwo", x[:, 0, 0], kernel)
  if (k, stride, padding) == (4, 2, 1):
    return _convt_k4s2p1(x, kernel)
  pad = k - 1 - padding
  return jax.lax.conv_general_dilated(
      x, kernel[::-1, ::-1], window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
      lhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _convt_k4s2p1(x: Array, kernel: Array) -> Array:
  """Output row 2m+a reads input rows m-1, m (a=0, taps 3, 1) or m, m+1 (a=1, taps 2, 0), and the
  same for columns. So the four phases are one 2x2 conv with 4*C_out outputs over the input padded
  by 1 ((H+1)x(W+1) map), phase (a, b) its window starting at (a, b): 4x fewer FLOPs than the
  dilated form, as ``layers.upsample2_conv3x3`` does for upsample + conv3x3.
  """
  n, h, w, cin = x.shape
  cout = kernel.shape[-1]
  taps = ((3, 1), (2, 0))  # per phase: the kernel index seen by window position 0, 1
  phases = jnp.stack([jnp.stack([kernel[jnp.array(taps[a])][:, jnp.array(taps[b])]
                                 for b in (0, 1)], -2) for a in (0, 1)], -3)
  y = conv_dw.conv(x, phases.reshape(2, 2, cin, 4 * cout).astype(x.dtype), 1, 1)
  y = y.reshape(n, h + 1, w + 1, 2, 2, cout)
  rows = [jnp.stack([y[:, a:a + h, b:b + w, a, b] for b in (0, 1)], 3) for a in (0, 1)]
  return jnp.stack(rows, 2).reshape(n, 2 * h, 2 * w, cout)


def _torch_convt_init(key, shape, dtype=jnp.float32):
  """kaiming_uniform(a=sqrt(5)) of a ConvTranspose2d: torch takes the fan from weight dim 1, which
  for a transposed conv is ``out_channels``: bound 1/sqrt(out * kh * kw)."""
  kh, kw, _, cout = shape
  bound = 1.0 / np.sqrt(cout * kh * kw)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class _ConvT(nn.Module):
  features: int
  stride: int
  padding: int
  kernel_size: int = 4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.param("kernel", _torch_convt_init,
                   (self.kernel_size, self.kernel_size, x.shape[-1], self.features), jnp.float32)
    return conv_transpose_torch(x, k.astype(x.dtype), self.stride, self.padding)


class MnistGANGenerator(nn.Module):
  """[Re]'s GenConv: ``[u, emb(y)]`` -> 32x32x3 image in [-1, 1]."""
  n_classes: int = 10
  latent_sz: int = 32
  ngf: int = 28

  @nn.compact
  def __call__(self, ys: Array, u: Array, train: bool = False) -> Array:
    """The image for labels ``ys`` [N] and noise ``u`` [N, latent_sz] (the random draws given)."""
    emb = nn.Embed(self.n_classes, self.n_classes, embedding_init=inits.embedding_init,
                   name="label_emb")(ys)
    x = jnp.concatenate([u, emb], -1)[:, None, None, :]
    specs = ((8 * self.ngf, 1, 0), (4 * self.ngf, 2, 1), (2 * self.ngf, 2, 1))
    for i, (cout, stride, pad) in enumerate(specs):
      x = _ConvT(cout, stride, pad, name=f"convt{i}")(x)
      x = leaky_relu(TorchBatchNorm(name=f"bn{i}")(x, train))
    return jnp.tanh(_ConvT(3, 2, 1, name="convt3")(x))

  def sample(self, ys: Array, key: Array, train: bool = False) -> Array:
    """Images for labels ``ys`` with fresh N(0, 1) noise (the authors' ``generator(y)``)."""
    return self(ys, jax.random.normal(key, (ys.shape[0], self.latent_sz)), train)


def make_generate_fn(gen: MnistGANGenerator, no_cfs: int):
  """``fn(variables, ys [B], key) -> (images, y_fg, y_bg, ys)``, each ``[no_cfs, B, ...]``, in eval
  mode: ``no_cfs`` samples of fresh noise per label, [Re]'s ``generate_gan_dataset``.

  The layout of ``generate_mnist``'s CGN function (``flatten=False``), so the generation job writes
  either; a GAN has no separate texture or background, so both label columns are the class.
  """

  def fn(variables, ys, key):
    one = lambda k: gen.apply(variables, ys, k, method=MnistGANGenerator.sample)
    images = jax.lax.map(one, jax.random.split(key, no_cfs))
    labels = jnp.broadcast_to(ys, (no_cfs,) + ys.shape)
    return images, labels, labels, labels

  return fn


def init_variables(model: MnistGANGenerator, key: Array, batch: int = 2) -> Any:
  ys = jnp.zeros((batch,), jnp.int32)
  u = jnp.zeros((batch, model.latent_sz))
  return jax.jit(lambda k: model.init(k, ys, u, train=False))(key)


def is_gan_checkpoint(checkpoint: str) -> bool:
  """Whether ``checkpoint`` is a directory that ``train_gan_mnist`` exported (``mnist_gan``)."""
  if not checkpoint or not os.path.isfile(os.path.join(checkpoint, checkpoints.META_FILE)):
    return False
  return checkpoints.load_meta(checkpoint).get("family") == FAMILY


def load(checkpoint: str) -> tuple[MnistGANGenerator, Any]:
  """The generator and its variables from a directory that ``train_gan_mnist`` exported.

  [Re]'s ``ckp.pth`` files have no converter yet; only exported directories load.
  """
  if not is_gan_checkpoint(checkpoint):
    raise ValueError(f"{checkpoint} is not an exported GAN generator; pass "
                     f"<train_gan_mnist workdir>/generator")
  variables, meta = loading.load_converted(checkpoint, FAMILY)
  return MnistGANGenerator(**meta["model_config"]), variables
