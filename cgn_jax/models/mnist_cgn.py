"""The MNIST CGN of the authors (mnists/models/cgn.py) and its two discriminators, in Flax.

Three small conditional generators — shape (mask), texture 1 (foreground), texture 2 (background) —
share the input ``[u, label_emb(y)]``. Parameter names follow the torch module indices so that the
converter's mapping reads like the checkpoint (``f_text1.3`` -> ``f_text1/conv1``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from cgn_jax.models import init as inits
from cgn_jax.models import loading
from cgn_jax.models.layers import (TorchBatchNorm, avg_pool_floor, instance_norm, leaky_relu,
                                   upsample2_conv3x3)

Array = jax.Array
MASK_MIN, MASK_MAX = 1e-4, 1 - 1e-4


class _Mechanism(nn.Module):
  """Linear -> (C, s, s) -> upsampling conv blocks; ``shape`` adds instance norms, ``texture`` a tanh."""
  kind: str  # "shape" or "texture"
  ngf: int
  init_sz: int
  init_type: str
  init_gain: float
  subpixel: bool = False

  @nn.compact
  def __call__(self, inp: Array, train: bool) -> Array:
    kinit = inits.kernel_init(self.init_type, self.init_gain)
    conv = partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)), kernel_init=kinit)
    bn = partial(TorchBatchNorm, scale_init=inits.bn_scale_init(self.init_type, self.init_gain))
    c0 = 2 * self.ngf
    x = nn.Dense(c0 * self.init_sz ** 2, kernel_init=kinit, name="fc",
                 bias_init=inits.bias_init(self.init_type, inp.shape[-1]))(inp)
    # torch reshapes the linear output as (C, H, W): channel-major, then we move C last.
    x = x.reshape(-1, c0, self.init_sz, self.init_sz).transpose(0, 2, 3, 1)
    if self.kind == "shape":
      x = instance_norm(x)
      for i, cout in enumerate((self.ngf, 1), start=1):
        x = self._upconv(x, cout, kinit, f"conv{i}")
        x = leaky_relu(bn(name=f"bn{i}")(x, train))
        x = instance_norm(x)  # applied after the LeakyReLU, so the raw mask map reaches about ±12
      return x
    for i, cout in enumerate((c0, self.ngf), start=1):
      x = self._upconv(x, cout, kinit, f"conv{i}")
      x = leaky_relu(bn(name=f"bn{i}")(x, train))
    x = conv(3, use_bias=True, name="conv3")(x)
    return jnp.tanh(bn(name="bn3")(x, train))


  def _upconv(self, x: Array, cout: int, kinit, name: str) -> Array:
    """nn.Upsample(x2) + bias-free conv3x3; the kernel is a plain 'kernel' param under ``name``."""
    kernel = _ConvKernel(cout, kinit, name=name)(x.shape[-1])
    return upsample2_conv3x3(x, kernel, self.subpixel)


class _ConvKernel(nn.Module):
  """Holds an HWIO 3x3 kernel under the same name/shape nn.Conv would use (converter-compatible)."""
  features: int
  kernel_init: Any

  @nn.compact
  def __call__(self, cin: int) -> Array:
    return self.param("kernel", self.kernel_init, (3, 3, cin, self.features), jnp.float32)


def tile_2x2(x: Array) -> Array:
  """Patch2Image(sz, 2): the 2x2 tiling of an NHWC batch (concatenate along W, then H)."""
  return jnp.tile(x, (1, 2, 2, 1))


def crop_offsets(key: Array, n: int, h: int, w: int) -> Array:
  """The shuffler's random window per sample, [N, 2] (row, col), each uniform in 0..size inclusive
  (torch's ``unfold`` of the 2x2 tiling yields size+1 windows)."""
  return jax.random.randint(key, (n, 2), 0, jnp.array([h + 1, w + 1]))


def crop_tiled(x: Array, offsets: Array) -> Array:
  """Full-size crops of the 2x2 tiling of ``x`` at ``offsets`` (a random circular shift).

  In torch the first ``choose_rand_patches`` call picks the row offset and the second the column
  offset, because unfold + advanced indexing transposes H and W between the calls.
  """
  _, h, w, c = x.shape
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], jnp.zeros_like(o[0])), (h, w, c))
  return jax.vmap(crop)(tile_2x2(x), offsets)


def shuffle_crop(key: Array, x: Array) -> tuple[Array, Array]:
  """The authors' texture shuffler: tile 2x2, then a random full-size crop per sample.

  Returns:
    The cropped batch and the offsets [N, 2] (row, col).
  """
  n, h, w, _ = x.shape
  offsets = crop_offsets(key, n, h, w)
  return crop_tiled(x, offsets), offsets


class MnistCGN(nn.Module):
  """mnists/models/cgn.py::CGN. Defaults are the authors' constructor defaults."""
  n_classes: int = 10
  latent_sz: int = 32
  ngf: int = 32
  img_sz: int = 32
  init_type: str = "orthogonal"
  init_gain: float = 0.1
  subpixel: bool = False  # fast upsample+conv (generation); False is the bit-faithful path

  def setup(self):
    self.label_emb = nn.Embed(self.n_classes, self.n_classes, embedding_init=inits.embedding_init)
    mech = partial(_Mechanism, ngf=self.ngf, init_sz=self.img_sz // 4, init_type=self.init_type,
                   init_gain=self.init_gain, subpixel=self.subpixel)
    self.f_shape = mech("shape")
    self.f_text1 = mech("texture")
    self.f_text2 = mech("texture")

  def get_inp(self, u: Array, ys: Array) -> Array:
    """``cat([u, label_emb(y)])``: noise first, embedding second (the discriminator does the opposite)."""
    return jnp.concatenate([u, self.label_emb(ys)], -1)

  def mechanisms(self, inp0: Array, inp1: Array, inp2: Array, train: bool) -> tuple[Array, Array, Array]:
    """Raw mechanism outputs: shape map (before the clamp), foreground and background (before shuffling)."""
    return self.f_shape(inp0, train), self.f_text1(inp1, train), self.f_text2(inp2, train)

  def __call__(self, y_shape: Array, key: Array, train: bool = False, y_fg: Array | None = None,
               y_bg: Array | None = None, counterfactual: bool = False) -> dict[str, Array]:
    """Samples (mask, foreground, background) for the given labels.

    Without explicit ``y_fg``/``y_bg`` the authors' semantics apply: one noise vector and one label
    for all three mechanisms, or, with ``counterfactual=True``, fresh noise and a random permutation of
    the batch's labels for each mechanism. Explicit texture labels get their own noise.

    Returns:
      dict with ``mask`` [N,H,W,1] clamped to [1e-4, 1-1e-4] (the authors repeat it to 3 channels; it
      broadcasts here), ``foreground``, ``background`` [N,H,W,3] and the labels used.
    """
    ks = jax.random.split(key, 7)
    n = y_shape.shape[0]
    noise = lambda k: jax.random.normal(k, (n, self.latent_sz))
    if counterfactual:
      y_fg = y_shape[jax.random.permutation(ks[3], n)] if y_fg is None else y_fg
      y_bg = y_shape[jax.random.permutation(ks[4], n)] if y_bg is None else y_bg
    offsets = lambda k: crop_offsets(k, n, self.img_sz, self.img_sz)
    if y_fg is None and y_bg is None:
      return self.from_draws(y_shape, noise(ks[0]), offsets(ks[5]), offsets(ks[6]), train)
    y_fg = y_shape if y_fg is None else y_fg
    y_bg = y_shape if y_bg is None else y_bg
    inp0 = self.get_inp(noise(ks[0]), y_shape)
    inp1 = self.get_inp(noise(ks[1]), y_fg)
    inp2 = self.get_inp(noise(ks[2]), y_bg)
    return self._compose_outputs(self.mechanisms(inp0, inp1, inp2, train), offsets(ks[5]),
                                 offsets(ks[6]), y_shape, y_fg, y_bg)

  def from_draws(self, ys: Array, u: Array, fg_offsets: Array, bg_offsets: Array,
                 train: bool = False) -> dict[str, Array]:
    """The authors' ``CGN.forward(ys)`` with its random draws given: one noise vector ``u`` [N, latent]
    and label for all three mechanisms, and the shufflers' crop offsets [N, 2] (row, col).

    Training draws through this method, so a test can replay the authors' recorded draws through the
    very step the job runs.
    """
    inp = self.get_inp(u, ys)
    return self._compose_outputs(self.mechanisms(inp, inp, inp, train), fg_offsets, bg_offsets,
                                 ys, ys, ys)

  @staticmethod
  def _compose_outputs(raw: tuple[Array, Array, Array], fg_offsets: Array, bg_offsets: Array,
                       y_shape: Array, y_fg: Array, y_bg: Array) -> dict[str, Array]:
    raw_mask, text1, text2 = raw
    return {"mask": jnp.clip(raw_mask, MASK_MIN, MASK_MAX),
            "foreground": crop_tiled(text1, fg_offsets), "background": crop_tiled(text2, bg_offsets),
            "y_shape": y_shape, "y_fg": y_fg, "y_bg": y_bg}


  def sample_mask(self, ys: Array, key: Array, train: bool = False) -> Array:
    """The shape mechanism alone: a clamped mask [N,H,W,1] for labels ``ys``."""
    u = jax.random.normal(key, (ys.shape[0], self.latent_sz))
    return jnp.clip(self.f_shape(self.get_inp(u, ys), train), MASK_MIN, MASK_MAX)

  def sample_textures(self, y_fg: Array, y_bg: Array, key: Array, train: bool = False
                      ) -> tuple[Array, Array]:
    """Shuffled foreground and background for their own labels, each with fresh noise."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    n = y_fg.shape[0]
    fg = self.f_text1(self.get_inp(jax.random.normal(k1, (n, self.latent_sz)), y_fg), train)
    bg = self.f_text2(self.get_inp(jax.random.normal(k2, (n, self.latent_sz)), y_bg), train)
    return shuffle_crop(k3, fg)[0], shuffle_crop(k4, bg)[0]


class DiscLin(nn.Module):
  """mnists/models/discriminator.py::DiscLin, torch default init (the authors do not re-initialise it)."""
  n_classes: int = 10
  ndf: int = 512

  @nn.compact
  def __call__(self, img: Array, labels: Array, train: bool = False) -> Array:
    emb = nn.Embed(self.n_classes, self.n_classes, embedding_init=inits.embedding_init,
                   name="label_embedding")(labels)
    # torch flattens NCHW; transpose back so a converted first layer sees the same input order.
    flat = jnp.transpose(img, (0, 3, 1, 2)).reshape(img.shape[0], -1)
    x = jnp.concatenate([flat, emb], -1)  # image first, label second
    dense = lambda i, f, x: nn.Dense(f, name=f"fc{i}", kernel_init=inits.kernel_init("torch_default", 0),
                                     bias_init=inits.bias_init("torch_default", x.shape[-1]))(x)
    x = leaky_relu(dense(0, self.ndf, x))
    for i in (1, 2):
      x = dense(i, self.ndf, x)
      x = leaky_relu(nn.Dropout(0.4, deterministic=not train)(x))
    return dense(3, 1, x)[:, 0]


class DiscConv(nn.Module):
  """mnists/models/discriminator.py::DiscConv with the authors' ``init_net`` (normal, 0.02)."""
  n_classes: int = 10
  ndf: int = 12
  init_type: str = "normal"
  init_gain: float = 0.02

  @nn.compact
  def __call__(self, ims: Array, labels: Array, train: bool = False) -> Array:
    emb = nn.Embed(self.n_classes, 1, embedding_init=inits.embedding_init, name="label_embedding")(labels)
    emb = jnp.broadcast_to(emb[:, None, None, :], ims.shape[:3] + (1,))
    x = jnp.concatenate([ims, emb], -1)  # the label is a 4th channel after RGB
    kinit = inits.kernel_init(self.init_type, self.init_gain)
    specs = ((self.ndf, 3, 1), (self.ndf * 2, 3, 1), (self.ndf * 4, 4, 2), (self.ndf * 4, 4, 2))
    for i, (cout, k, s) in enumerate(specs):
      x = nn.Conv(cout, (k, k), strides=(s, s), padding="VALID", use_bias=False, kernel_init=kinit,
                  name=f"conv{i}")(x)
      x = TorchBatchNorm(scale_init=inits.bn_scale_init(self.init_type, self.init_gain),
                         name=f"bn{i}")(x, train)
      x = leaky_relu(x)
    x = avg_pool_floor(x, 3)  # 5x5 -> 1x1 from the top-left 3x3 window only (floor mode)
    x = nn.Conv(1, (1, 1), use_bias=False, kernel_init=kinit, name="conv_out")(x)
    return x.reshape(x.shape[0])


def init_variables(model: nn.Module, key: Array, batch: int = 2, img_sz: int = 32) -> Any:
  """Fresh variables for any model in this file (the discriminators take an image and labels).

  Jitted, as the training job's: op by op, the init takes ~4x as long (16 s vs 4 s here).
  """
  ys = jnp.zeros((batch,), jnp.int32)
  if isinstance(model, MnistCGN):
    return jax.jit(lambda k: model.init(k, ys, k, train=False))(key)
  img = jnp.zeros((batch, img_sz, img_sz, 3))
  return jax.jit(lambda k: model.init(k, img, ys, train=False))(key)


MODULES: dict[str, type[nn.Module]] = {"mnist_cgn": MnistCGN, "disc_lin": DiscLin,
                                       "disc_conv": DiscConv}


def load(checkpoint: str, cache_dir: str | None = None, family: str | None = None,
         **module_kwargs: Any) -> tuple[nn.Module, Any]:
  """A generator or discriminator of this file and its variables, from a converted dir or the
  authors' ``.pth`` (converted once into ``cache_dir``, see ``loading.converted_dir``).

  Args:
    checkpoint: the directory or the ``.pth``.
    cache_dir: where a ``.pth`` is converted to; ``None`` is ``loading.default_cache_dir()``.
    family: ``mnist_cgn``, ``disc_lin`` or ``disc_conv``. A directory knows its own (``None``: take
      it; given: it must match); a ``.pth`` does not (``None`` means ``mnist_cgn``).
    **module_kwargs: extra module fields, e.g. ``subpixel=True`` for fast generation.

  Returns:
    ``(module, variables)``, the module built from the stored ``model_config``.
  """
  family = loading.pick_family(checkpoint, family, MODULES, "mnist_cgn", "cgn_jax.models.mnist_cgn")
  variables, meta = loading.load_converted(checkpoint, family, cache_dir)
  return MODULES[family](**meta["model_config"], **module_kwargs), variables


def load_or_init(checkpoint: str, cache_dir: str | None, seed: int = 0,
                 fields: Mapping[str, Any] | None = None) -> tuple[MnistCGN, Any]:
  """``load(checkpoint)`` of a generator, or when ``checkpoint`` is empty a random
  ``MnistCGN(**fields)`` from ``seed``: the jobs' plumbing runs need no weights."""
  if checkpoint:
    return load(checkpoint, cache_dir, family="mnist_cgn")
  model = MnistCGN(**(fields or {}))
  return model, init_variables(model, jax.random.key(seed))
