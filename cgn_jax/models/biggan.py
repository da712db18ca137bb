"""BigGAN-deep generator (Brock et al.) in Flax, numerically equal to the authors' PyTorch port.

The ImageNet CGN is four BigGAN-deep generators; the reference is the authors'
``imagenet/models/biggan.py`` (the HuggingFace ``pytorch-pretrained-BigGAN`` model). Everything here
is NHWC. Variables:

* ``params``: trainable weights (SN layers store the *un*-normalised ``weight_orig`` as ``kernel``).
* ``batch_stats``: never touched by an optimiser: the spectral-norm vectors ``u``/``v`` (torch's
  ``weight_u``/``weight_v``, in torch's shapes) and BigGAN's precomputed per-truncation batch-norm
  statistics ``running_means``/``running_vars`` [n_stats, C]. Train mode updates ``u``/``v`` (pass
  ``mutable=['batch_stats']``); the statistics are never updated, as in the original.

The truncation may be a Python float (the authors' float64 arithmetic, exact), a traced ``jax``
value (selection computed in-graph, one compilation for every value) or a precomputed
:class:`StatSelection` (host float64 arithmetic fed through ``jit`` as data).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from cgn_jax.models import init as inits
from cgn_jax.models import loading
from cgn_jax.models.layers import upsample_nearest

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST

# (up-sample?, in-channel multiple, out-channel multiple) per GenBlock, from the published
# pytorch-pretrained-BigGAN configs; channels are multiples of channel_width.
LAYERS_128 = ((False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8),
              (True, 8, 4), (False, 4, 4), (True, 4, 2), (False, 2, 2), (True, 2, 1))
LAYERS_256 = ((False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8),
              (True, 8, 8), (False, 8, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2),
              (False, 2, 2), (True, 2, 1))
LAYERS_512 = LAYERS_256 + ((False, 1, 1), (True, 1, 1))
PUBLISHED_LAYERS = {128: LAYERS_128, 256: LAYERS_256, 512: LAYERS_512}


@dataclasses.dataclass(frozen=True)
class BigGANConfig:
  """Mirror of the authors' ``BigGANConfig``; defaults are the 256x256 model.

  ``class_embed_dim`` is kept for fidelity but, as in the original, unused: the class embedding
  has ``z_dim`` outputs. ``eps`` serves both the batch norms and the spectral norms.
  """
  output_dim: int = 256
  z_dim: int = 128
  class_embed_dim: int = 128
  channel_width: int = 128
  num_classes: int = 1000
  layers: tuple[tuple[bool, int, int], ...] = LAYERS_256
  attention_layer_position: int = 8
  eps: float = 1e-4
  n_stats: int = 51

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BigGANConfig":
    d = dict(d)
    if "layers" in d:
      d["layers"] = tuple((bool(u), int(i), int(o)) for u, i, o in d["layers"])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["layers"] = [list(l) for l in self.layers]
    return d

  @classmethod
  def deep(cls, output_dim: int = 256, channel_width: int = 128, **kw) -> "BigGANConfig":
    """The published BigGAN-deep layout for 128/256/512 pixels at any channel width."""
    if output_dim not in PUBLISHED_LAYERS:
      raise ValueError(f"output_dim must be one of {sorted(PUBLISHED_LAYERS)}, got {output_dim}")
    return cls(output_dim=output_dim, channel_width=channel_width,
               layers=PUBLISHED_LAYERS[output_dim], **kw)


# ---------------------------------------------------------------------------------------------
# Truncation -> row of the precomputed statistics.

class StatSelection(NamedTuple):
  """Which statistics row(s) a truncation uses: ``rows[start]*coef + rows[start+1]*one_minus``,
  or ``rows[start]`` when ``coef == 0``. Fields are Python/NumPy scalars (static) or jax scalars."""
  start: Any
  coef: Any
  one_minus: Any


def stat_selection(truncation: float, n_stats: int = 51) -> StatSelection:
  """The authors' selection in Python float64, bit for bit.

  Trap: ``math.modf(t / (1/50))`` in float64 gives 0.4 -> row 20 exactly but 0.28 -> 14 + 1.8e-15,
  and the interpolation weights are *reversed* (``coef`` weighs the lower row). torch multiplies the
  float32 rows by the Python scalars after casting them to float32, hence the float32 casts here.
  """
  t = float(truncation)
  if not 0.0 < t <= 1.0:
    raise ValueError(f"truncation must be in (0, 1], got {t}")  # the original asserts this
  coef, start = math.modf(t / (1.0 / (n_stats - 1)))
  return StatSelection(int(start), np.float32(coef), np.float32(1.0 - coef))


def _division_is_exact(n: int) -> bool:
  """True when, for every float32 t, float64 ``t / (1/n)`` equals the exact ``n*t``.

  ``n*t`` has at most 24+7 significant bits, so it is a double; the division lands on it when the
  relative error of ``fl64(1/n)`` is below half an ulp at a power of two (2**-54; 2**-55 is asked
  for margin). n = 50 qualifies (2.1e-17); this was also checked exhaustively over all float32 in
  (0, 1]. n < 128 keeps ``n * mantissa`` inside int32.
  """
  if not 0 < n < 128:
    return False
  rel = abs(Fraction(1.0 / n) - Fraction(1, n)) * n
  return rel < Fraction(1, 2**55)


def stat_selection_traced(truncation: Array, n_stats: int = 51) -> StatSelection:
  """The authors' selection computed in-graph for a float32 truncation (no recompilation per value).

  For n_stats = 51 the result equals ``stat_selection(float(t))`` exactly for every normal float32
  t >= 2**-29: float64 ``t / (1/50)`` is exactly ``50*t`` (see ``_division_is_exact``), so the
  integer part and fraction are computed exactly from the float32 bits in int32 arithmetic and each
  is rounded to float32 once, as torch does. Below 2**-29 Python rounds ``1 - coef`` twice (float64,
  then float32), which may differ here by one float32 ulp. For other ``n_stats`` without that
  property a plain float32 computation is used (approximate). No range check is possible in-graph
  (the original asserts 0 < t <= 1): t is clipped to [0, 1] (t = 0 selects row 0).
  """
  t = jnp.clip(jnp.asarray(truncation, jnp.float32), 0.0, 1.0)
  n = n_stats - 1
  if not _division_is_exact(n):
    q = t * n
    start = jnp.floor(q)
    coef = q - start
    return StatSelection(start.astype(jnp.int32), coef, 1.0 - coef)
  bits = jax.lax.bitcast_convert_type(t, jnp.int32)
  mant = (bits & 0x7FFFFF) | 0x800000
  s = 150 - ((bits >> 23) & 0xFF)          # t = mant * 2**-s, s >= 23 for t <= 1
  p = mant * n                             # n*t = p * 2**-s exactly; p < 2**31
  pow2 = lambda e: jax.lax.bitcast_convert_type((127 - e) << 23, jnp.float32)  # exact 2**-e
  # Case t >= 2**-7 (s <= 30): split p at bit s.
  sc = jnp.minimum(s, 30)
  start_a = p >> sc
  frac_a = p - (start_a << sc)
  coef_a = frac_a.astype(jnp.float32) * pow2(sc)
  one_minus_a = ((1 << sc) - frac_a).astype(jnp.float32) * pow2(sc)
  # Case t < 2**-7: start = 0, coef = n*t (one rounding); 1 - n*t rounded to the 2**-24 grid of
  # [0.5, 1] with round-half-even, from the bits of p that fall below that grid.
  k = jnp.clip(s - 24, 1, 30)
  q = jnp.where(s - 24 > 30, 0, p >> k)
  r = jnp.where(s - 24 > 30, p, p - (q << k))
  half = jnp.where(s - 24 > 30, jnp.int32(2**30), 1 << (k - 1))
  base = (1 << 24) - q
  down = (r > half) | ((r == half) & (base % 2 == 1))
  one_minus_b = (base - down.astype(jnp.int32)).astype(jnp.float32) * pow2(24)
  small = s > 30
  return StatSelection(jnp.where(small, 0, start_a).astype(jnp.int32),
                       jnp.where(small, t * n, coef_a),
                       jnp.where(small, one_minus_b, one_minus_a))


def as_stat_selection(truncation: Union[float, Array, StatSelection], n_stats: int) -> StatSelection:
  """Python number -> float64 path; StatSelection -> as given; anything else -> in-graph path."""
  if isinstance(truncation, StatSelection):
    return truncation
  if isinstance(truncation, (int, float, np.floating, np.integer)):
    return stat_selection(float(truncation), n_stats)
  return stat_selection_traced(truncation, n_stats)


def _row_weights(sel: StatSelection, n_stats: int) -> Union[StatSelection, Array]:
  """Static selections stay as they are; a traced one becomes a weight per statistics row
  (``coef`` at ``start``, ``one_minus`` at ``start+1``, or 1 at ``start`` when ``coef == 0``), computed
  once per forward. A weighted sum over rows adds only exact zeros to the two products, so it equals
  the indexed form, and compiles much faster than ~100 dynamic slices."""
  if isinstance(sel.start, (int, np.integer)):
    return sel
  rows = jnp.arange(n_stats)
  coef = jnp.asarray(sel.coef, jnp.float32)
  interp = coef != 0
  w_lo = jnp.where(interp, coef, 1.0)
  w_hi = jnp.where(interp, jnp.asarray(sel.one_minus, jnp.float32), 0.0)
  start = jnp.clip(sel.start, 0, n_stats - 1)
  return jnp.where(rows == start, w_lo, 0.0) + jnp.where(rows == start + 1, w_hi, 0.0)


def _select_rows(rows: Array, sel: Union[StatSelection, Array]) -> Array:
  if isinstance(sel, StatSelection):
    if sel.coef == 0:
      return rows[sel.start]
    return rows[sel.start] * sel.coef + rows[sel.start + 1] * sel.one_minus
  return jnp.sum(rows * sel[:, None], axis=0)


# ---------------------------------------------------------------------------------------------
# Spectral norm with torch semantics.

# Random init only matters for random-weight runs (spectral norm rescales anyway). Flax traces a
# parameter's initializer on every apply to check shapes; a plain normal traces ~10x faster than
# the truncated normal of lecun_normal, which saves seconds per compilation of BigGAN-deep.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _normalize(x: Array, eps: float) -> Array:
  """F.normalize(x, dim=0, eps): x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


def _spectral_sigma(mdl: nn.Module, kernel: Array, train: bool, eps: float) -> Array:
  """sigma = u^T W v for W = torch's ``weight.reshape(out, -1)``.

  ``kernel`` is a Flax Dense (in, out) or Conv HWIO kernel. Trap: torch flattens the OIHW conv
  weight to (O, I*kh*kw), so ``v`` is in (i, h, w) order; it is reordered here instead of
  transposing the kernel. Eval uses the stored u, v as they are (no iteration, so sigma is not the
  top singular value of a checkpoint whose u/v are not converged). Train does one power iteration
  v <- normalize(W^T u), u <- normalize(W v), stores both, and lets gradients flow only through W.
  The eps is the layer's (config.eps = 1e-4 in BigGAN, not torch's default 1e-12).
  The products are written as multiply + reduce rather than matrix-vector dots: XLA:CPU compiles
  the 150 small gemvs of BigGAN-deep slowly (~25 s), the reductions fuse cheaply.
  """
  spatial = kernel.shape[:-2]                 # () for Dense, (kh, kw) for conv
  n_in, out = kernel.shape[-2], kernel.shape[-1]
  k = n_in * math.prod(spatial)
  red = tuple(range(kernel.ndim - 1))

  def w_v(w, v):                              # W @ v -> (out,)
    v = v.reshape((n_in,) + spatial)
    v = jnp.moveaxis(v, 0, -1)                # (i, h, w) -> (h, w, i)
    return jnp.sum(w * v[..., None], axis=red)

  def wt_u(w, u):                             # W^T @ u -> (k,) in torch's (i, h, w) order
    return jnp.moveaxis(jnp.sum(w * u, axis=-1), -1, 0).reshape(k)

  def init_uv():
    # torch's init: random unit vectors (see init_variables for a better start).
    ku, kv = jax.random.split(mdl.make_rng("params"))
    return (_normalize(jax.random.normal(ku, (out,)), eps),
            _normalize(jax.random.normal(kv, (k,)), eps))

  uv = init_uv() if mdl.is_initializing() else None
  u = mdl.variable("batch_stats", "u", lambda: uv[0])
  v = mdl.variable("batch_stats", "v", lambda: uv[1])
  uu, vv = u.value, v.value
  if train:
    w = jax.lax.stop_gradient(kernel)
    vv = _normalize(wt_u(w, uu), eps)
    uu = _normalize(w_v(w, vv), eps)
    if not mdl.is_initializing():
      u.value, v.value = uu, vv
  uu, vv = jax.lax.stop_gradient(uu), jax.lax.stop_gradient(vv)
  return jnp.sum(uu * w_v(kernel, vv))


class SNDense(nn.Module):
  """Spectral-normalised torch Linear; ``kernel`` is (in, out), so torch's W is ``kernel.T``."""
  features: int
  use_bias: bool = True
  eps: float = 1e-4
  dtype: Any = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    kernel = self.param("kernel", _KERNEL_INIT, (x.shape[-1], self.features))
    sigma = _spectral_sigma(self, kernel, train, self.eps)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
    y = y / sigma.astype(self.dtype)  # = x @ (W / sigma) up to rounding; see SNConv
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class SNConv(nn.Module):
  """Spectral-normalised torch Conv2d (stride 1, 'same' padding), kernel HWIO.

  ``v`` keeps torch's (I*kh*kw,) shape and order (see ``_spectral_sigma``). torch convolves with
  ``W / sigma``; here the output is divided by sigma instead: the same value up to float32 rounding
  (measured against a float64 run of the authors' model, this port is as close as torch's own
  float32 result), and it saves a pass over every weight and one compiled kernel per layer; the
  gradient is the same function of W. ``out_slice``
  computes only the first output channels: exact, since output channels are independent (used for
  conv_to_rgb, of which only 3 of ch channels are kept); sigma still uses the whole kernel.
  """
  features: int
  kernel_size: int = 1
  use_bias: bool = True
  eps: float = 1e-4
  dtype: Any = jnp.float32
  precision: Any = HIGHEST
  out_slice: int | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    ks = self.kernel_size
    kernel = self.param("kernel", _KERNEL_INIT,
                        (ks, ks, x.shape[-1], self.features))
    sigma = _spectral_sigma(self, kernel, train, self.eps)
    n = self.features if self.out_slice is None else self.out_slice
    w = kernel[..., :n].astype(self.dtype)
    x = x.astype(self.dtype)
    if ks == 1:
      y = jnp.dot(x, w[0, 0], precision=self.precision)
    else:
      pad = ks // 2
      y = jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=self.precision)
    y = y / sigma.astype(self.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))[:n].astype(self.dtype)
    return y


# ---------------------------------------------------------------------------------------------
# Blocks.

class BigGANBatchNorm(nn.Module):
  """Batch norm with precomputed statistics per truncation, optionally class-conditional.

  Never updates its statistics (train mode included). Conditional: ``(x - m) / sqrt(v + eps) *
  (1 + scale(c)) + offset(c)`` with bias-free SN linears. Unconditional: torch's eval batch_norm,
  which folds into ``x * a + b`` with ``a = weight / sqrt(v + eps)``, ``b = bias - m * a``.
  The arithmetic is float32 whatever ``dtype`` (the output's dtype) is.
  """
  n_stats: int = 51
  eps: float = 1e-4
  conditional: bool = True
  dtype: Any = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x: Array, sel: StatSelection, cond: Array | None = None,
               train: bool = False) -> Array:
    c = x.shape[-1]
    means = self.variable("batch_stats", "running_means", jnp.zeros, (self.n_stats, c), jnp.float32)
    varis = self.variable("batch_stats", "running_vars", jnp.ones, (self.n_stats, c), jnp.float32)
    mean, var = _select_rows(means.value, sel), _select_rows(varis.value, sel)
    x = x.astype(jnp.float32)
    if self.conditional:
      lin = dict(features=c, use_bias=False, eps=self.eps, precision=self.precision)
      weight = 1 + SNDense(**lin, name="scale")(cond, train)
      bias = SNDense(**lin, name="offset")(cond, train)
      y = (x - mean) / jnp.sqrt(var + self.eps)
      return (y * weight[:, None, None, :] + bias[:, None, None, :]).astype(self.dtype)
    # The torch original creates these with torch.Tensor(n): uninitialised memory. Any real
    # checkpoint overwrites them; ones/zeros here make random-weight models usable.
    weight = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    a = weight * (1 / jnp.sqrt(var + self.eps))
    b = bias - mean * a
    return (x * a + b).astype(self.dtype)


class GenBlock(nn.Module):
  """Bottleneck residual block: 4 x (cond-BN, ReLU, conv) with 1x1 / 3x3 / 3x3 / 1x1 convs.

  Both branches are up-sampled (nearest x2): the main one after its second BN. When channels shrink,
  the skip branch keeps the *first* in//2 channels (no 1x1 conv, unlike BigGAN). The residual
  stream stays float32 under bf16 compute: it grows to |x| ~ 60, where bf16's spacing is 0.25.
  """
  in_size: int
  out_size: int
  up_sample: bool
  n_stats: int = 51
  eps: float = 1e-4
  dtype: Any = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x: Array, cond: Array, sel: StatSelection, train: bool = False) -> Array:
    mid = self.in_size // 4
    common = dict(eps=self.eps, dtype=self.dtype, precision=self.precision)
    bn = lambda name: BigGANBatchNorm(self.n_stats, name=name, **common)
    h = nn.relu(bn("bn_0")(x, sel, cond, train))
    h = SNConv(mid, 1, name="conv_0", **common)(h, train)
    h = nn.relu(bn("bn_1")(h, sel, cond, train))
    if self.up_sample:
      h = upsample_nearest(h)
    h = SNConv(mid, 3, name="conv_1", **common)(h, train)
    h = nn.relu(bn("bn_2")(h, sel, cond, train))
    h = SNConv(mid, 3, name="conv_2", **common)(h, train)
    h = nn.relu(bn("bn_3")(h, sel, cond, train))
    h = SNConv(self.out_size, 1, name="conv_3", **common)(h, train)
    if self.in_size != self.out_size:
      x = x[..., :x.shape[-1] // 2]
    if self.up_sample:
      x = upsample_nearest(x)
    return h.astype(jnp.float32) + x


class SelfAttn(nn.Module):
  """SAGAN self-attention: theta/phi with C/8 channels, g with C/2, phi and g max-pooled 2x2,
  softmax over the pooled keys, ``x + gamma * o_conv(attention @ g)``; all convs bias-free SN."""
  eps: float = 1e-4
  dtype: Any = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    b, h, w, c = x.shape
    conv = lambda f, name: SNConv(f, 1, use_bias=False, eps=self.eps, dtype=self.dtype,
                                  precision=self.precision, name=name)
    pool = lambda t: t.reshape(b, h // 2, 2, w // 2, 2, t.shape[-1]).max(axis=(2, 4))
    theta = conv(c // 8, "snconv1x1_theta")(x, train).reshape(b, h * w, c // 8)
    phi = pool(conv(c // 8, "snconv1x1_phi")(x, train)).reshape(b, h * w // 4, c // 8)
    g = pool(conv(c // 2, "snconv1x1_g")(x, train)).reshape(b, h * w // 4, c // 2)
    logits = jnp.einsum("bqc,bkc->bqk", theta, phi, precision=self.precision)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    attn_g = jnp.einsum("bqk,bkc->bqc", attn, g, precision=self.precision).reshape(b, h, w, c // 2)
    o = conv(c, "snconv1x1_o_conv")(attn_g, train)
    gamma = self.param("gamma", nn.initializers.zeros, (1,))
    return x + gamma * o.astype(jnp.float32)


class Generator(nn.Module):
  """gen_z -> reshape to 4x4 -> GenBlocks (self-attention before block ``attention_layer_position``)
  -> unconditional BN -> ReLU -> conv_to_rgb -> first 3 channels -> tanh.

  Module names follow torch's ``generator.layers.N``: the attention layer takes an index in that
  list, so the GenBlocks after it are shifted by one.
  """
  config: BigGANConfig
  dtype: Any = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, cond: Array, sel: StatSelection, train: bool = False) -> Array:
    cfg = self.config
    ch = cfg.channel_width
    common = dict(eps=cfg.eps, dtype=self.dtype, precision=self.precision)
    f32 = dict(eps=cfg.eps, precision=self.precision)
    z = SNDense(4 * 4 * 16 * ch, name="gen_z", **f32)(cond, train)
    # torch does view(-1, 4, 4, 16ch).permute(0, 3, 1, 2): the vector is laid out HWC (TF's
    # order), which is already our NHWC.
    z = z.reshape(z.shape[0], 4, 4, 16 * ch)
    idx = 0
    for i, (up, cin, cout) in enumerate(cfg.layers):
      if i == cfg.attention_layer_position:
        z = SelfAttn(name=f"layers_{idx}", **common)(z, train)
        idx += 1
      z = GenBlock(ch * cin, ch * cout, up, cfg.n_stats, name=f"layers_{idx}", **common)(
          z, cond, sel, train)
      idx += 1
    z = BigGANBatchNorm(cfg.n_stats, conditional=False, name="bn", **f32)(z, sel, None, train)
    z = nn.relu(z)
    # conv_to_rgb has ch outputs but only the first 3 are used: compute only those. It stays
    # float32 under bf16 compute: its output cancels heavily, and with 3 outputs it is cheap.
    z = SNConv(ch, 3, out_slice=3, name="conv_to_rgb", **f32)(z, train)
    return jnp.tanh(z)


class ClassEmbedding(nn.Module):
  """The authors' bias-free ``nn.Linear(num_classes, z_dim)`` (no spectral norm), applied to a
  one-hot/soft class vector, or gathered for integer class ids (identical for exact one-hots)."""
  num_classes: int
  features: int
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, y: Array) -> Array:
    kernel = self.param("kernel", _KERNEL_INIT, (self.num_classes, self.features))
    if jnp.issubdtype(y.dtype, jnp.integer):
      return jnp.take(kernel, y, axis=0)
    return jnp.dot(y.astype(jnp.float32), kernel, precision=self.precision)


class BigGAN(nn.Module):
  """BigGAN-deep generator: ``BigGAN(cfg).apply(variables, z, y, truncation)`` -> [B, H, W, 3].

  ``z`` [B, z_dim] is the (already truncated) noise, ``y`` a one-hot [B, num_classes] or int class
  ids [B], ``truncation`` a Python float, a traced scalar or a StatSelection (module docstring).
  Only the batch-norm statistics depend on the truncation. ``dtype`` is the dtype of the
  GenBlock/attention convolutions (bf16 for accelerators); parameters, spectral norms, batch-norm
  arithmetic, the residual stream, gen_z and conv_to_rgb stay float32, and the image is float32.
  Even so each block adds ~1% relative error in bf16 (~10% on the image after 12 blocks; see
  tests). ``precision`` defaults to HIGHEST so that float32 matches torch on GPUs too (no TF32).
  """
  config: BigGANConfig = BigGANConfig()
  dtype: Any = jnp.float32
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, z: Array, y: Array, truncation: Union[float, Array, StatSelection],
               train: bool = False) -> Array:
    cfg = self.config
    sel = _row_weights(as_stat_selection(truncation, cfg.n_stats), cfg.n_stats)
    embed = ClassEmbedding(cfg.num_classes, cfg.z_dim, self.precision, name="embeddings")(y)
    cond = jnp.concatenate([z.astype(jnp.float32), embed], axis=-1)
    return Generator(cfg, self.dtype, self.precision, name="generator")(cond, sel, train)


# ---------------------------------------------------------------------------------------------
# Helpers.

def truncated_noise(key: Array, shape: Sequence[int], truncation: Union[float, Array] = 1.0) -> Array:
  """The one noise sampler of every BigGAN job, as the authors draw it: a truncated normal in
  [-2, 2] (scipy ``truncnorm(-2, 2)``'s distribution, not its stream), times the truncation."""
  return jax.random.truncated_normal(key, -2.0, 2.0, tuple(shape), jnp.float32) * truncation


def truncated_noise_sample(key_or_seed: Union[int, Array], batch: int, dim_z: int = 128,
                           truncation: float = 1.0) -> Array:
  """``[batch, dim_z]`` of :func:`truncated_noise` from a key or an int seed."""
  key = jax.random.PRNGKey(key_or_seed) if isinstance(key_or_seed, int) else key_or_seed
  return truncated_noise(key, (batch, dim_z), truncation)


def one_hot_from_int(classes: Union[int, Sequence[int], Array], n: int = 1000) -> Array:
  """Class ids -> float32 one-hot [B, n]."""
  return jax.nn.one_hot(jnp.atleast_1d(jnp.asarray(classes, jnp.int32)), n, dtype=jnp.float32)


def init_variables(config: BigGANConfig = BigGANConfig(), seed: int = 0) -> dict:
  """Random variables for ``config``, drawn on the host with NumPy.

  Prefer this to ``BigGAN(config).init`` on CPU: XLA compiles the random-bit generation of ~600
  arrays for minutes there. Kernels are N(0, 1/fan_in), biases/gamma/means 0, variances and the
  final BN scale 1, and each spectral norm's u, v come from 5 power iterations, so that sigma is
  about the top singular value (random u, v, as torch draws them, can give sigma ~ 0).
  """
  rng = np.random.default_rng(seed)
  args = (jnp.zeros((1, config.z_dim), jnp.float32), jnp.zeros((1,), jnp.int32), 1.0)
  variables = inits.host_random_variables(BigGAN(config), args, rng)  # u, v set below
  return set_spectral_vectors(variables, rng)


def set_spectral_vectors(variables: dict, rng: np.random.Generator | None = None,
                         iterations: int = 5) -> dict:
  """Sets every spectral norm's stored ``u``, ``v`` (in place, NumPy) from its kernel.

  ``iterations`` power iterations from a random ``v`` (drawn from ``rng``), or with
  ``iterations=0`` the exact top singular pair (SVD): then train mode's power iteration leaves them
  unchanged up to rounding, which makes runs with different micro-batch splits comparable.
  """
  rng = rng or np.random.default_rng(0)
  sn_modules = [p[:-1] for p, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
                if p[-1].key == "u"]
  for path in sn_modules:
    params, stats = variables["params"], variables["batch_stats"]
    for p in path:
      params, stats = params[p.key], stats[p.key]
    kernel = np.asarray(params["kernel"], np.float64)
    # torch's (out, in*kh*kw) matrix of a Dense (in, out) or HWIO kernel.
    w = np.moveaxis(kernel, -1, 0)
    w = (np.moveaxis(w, -1, 1) if kernel.ndim == 4 else w).reshape(kernel.shape[-1], -1)
    if iterations:
      v = rng.standard_normal(w.shape[1])
      for _ in range(iterations):
        u = w @ v
        u /= np.linalg.norm(u)
        v = w.T @ u
        v /= np.linalg.norm(v)
    else:
      left, _, right = np.linalg.svd(w, full_matrices=False)
      u, v = left[:, 0], right[0]
    stats["u"], stats["v"] = u.astype(np.float32), v.astype(np.float32)
  return variables


def load(checkpoint: str, cache_dir: str | None = None,
         **module_kwargs: Any) -> tuple[BigGAN, Any]:
  """BigGAN-deep from a converted dir or the published ``pytorch_model.bin``/``.pth`` (converted
  once into ``cache_dir``; ``None`` is ``loading.default_cache_dir()``).

  Args:
    checkpoint: the directory or the file.
    cache_dir: where a file is converted to.
    **module_kwargs: ``BigGAN`` fields other than the stored config, e.g. ``dtype``.

  Returns:
    ``(module, variables)``; ``module.config`` is the stored architecture.
  """
  variables, meta = loading.load_converted(checkpoint, "biggan", cache_dir)
  return BigGAN(BigGANConfig.from_dict(meta["model_config"]), **module_kwargs), variables
