"""The ImageNet CGN (the authors' imagenet/models/cgn.py): four BigGAN-deeps and a U2-Net.

* ``biggan_GT`` — a frozen BigGAN-deep whose image ``x_gt`` is the reconstruction target;
* ``f_shape`` — BigGAN-deep -> pre-mask -> frozen ``u2net`` -> mask clamped to [1e-4, 1 - 1e-4];
* ``f_text`` — BigGAN-deep -> foreground (texture);
* ``f_bg`` — BigGAN-deep -> background; the U2-Net mask of the background feeds the background
  loss (it should find no object there).

All four generators share one noise vector; each mechanism has its own class. Submodule names are
the torch attribute names, so ``variables['params']['f_shape']`` is the converted ``f_shape.*``.

What is frozen and what is not (the authors' ``CGN.train`` keeps ``biggan_GT`` and ``u2net`` in
eval mode even while training): ``biggan_GT`` and ``u2net`` always run in eval mode; the three
mechanisms follow ``train``, which in BigGAN only means one spectral-norm power iteration per
forward pass (u/v updated in ``batch_stats``) — BigGAN's batch norms always use their precomputed
statistics. Gradients are the caller's business: :func:`split_trainable` separates the mechanisms'
params (optimised) from the frozen ones (constants of the step, never in an optimizer state).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Union

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np

from cgn_jax.composer import compose
from cgn_jax.models import biggan as biggan_lib
from cgn_jax.models import init as inits
from cgn_jax.models import loading
from cgn_jax.models.biggan import BigGAN, BigGANConfig, StatSelection
from cgn_jax.models.u2net import U2Net

Array = jax.Array

MECHANISMS = ("f_shape", "f_text", "f_bg")
FROZEN = ("biggan_GT", "u2net")
MASK_CLAMP = (1e-4, 1 - 1e-4)  # torch.clamp(mask, 0.0001, 0.9999) in CGN.forward


@dataclasses.dataclass(frozen=True)
class CGNConfig:
  """Architecture of the four generators and the mask network."""
  biggan: BigGANConfig = BigGANConfig()
  u2net_variant: str = "u2net"

  def to_dict(self) -> dict[str, Any]:
    return {"biggan": self.biggan.to_dict(), "u2net": {"variant": self.u2net_variant, "out_ch": 1}}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CGNConfig":
    return cls(BigGANConfig.from_dict(d["biggan"]), d["u2net"]["variant"])


class ImagenetCGN(nn.Module):
  """``apply(variables, z, y_shape, y_text, y_bg, truncation, train)`` -> dict of NHWC images.

  ``z`` [B, z_dim] is the (already truncated) noise shared by all generators; the labels are int
  class ids [B] or (soft) class vectors [B, num_classes] (interpolations). The output dict holds
  ``premask`` (gradient stopped, as the original's ``premask.detach()``), ``mask`` [B, H, W, 1],
  ``foreground``, ``background``, ``x_gen`` (the composite), and unless disabled ``x_gt``
  (gradient stopped; from ``y_shape``, like the original's ``inp0``) and ``bg_mask``.
  """
  config: CGNConfig = CGNConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array, y_shape: Array, y_text: Array, y_bg: Array,
               truncation: Union[float, Array, StatSelection], train: bool = False,
               with_x_gt: bool = True, with_bg_mask: bool = True) -> dict[str, Array]:
    gan = lambda name: BigGAN(self.config.biggan, dtype=self.dtype, name=name)
    u2net = U2Net(self.config.u2net_variant, dtype=self.dtype, name="u2net")
    out = {}
    if with_x_gt:
      out["x_gt"] = jax.lax.stop_gradient(gan("biggan_GT")(z, y_shape, truncation, train=False))
    premask = gan("f_shape")(z, y_shape, truncation, train=train)
    foreground = gan("f_text")(z, y_text, truncation, train=train)
    background = gan("f_bg")(z, y_bg, truncation, train=train)
    # u2net stays frozen but differentiable: the mask's gradient reaches f_shape through it. The
    # pre-mask and the background go through it as one batch (eval-mode BN: rows are independent,
    # so this equals two calls; one call compiles once and keeps accelerators busier).
    if with_bg_mask:
      both = u2net(jnp.concatenate([premask, background], axis=0), train=False)
      raw_mask, out["bg_mask"] = both[:z.shape[0]], both[z.shape[0]:]
    else:
      raw_mask = u2net(premask, train=False)
    mask = jnp.clip(raw_mask, *MASK_CLAMP)
    out.update(premask=jax.lax.stop_gradient(premask), mask=mask, foreground=foreground,
               background=background, x_gen=compose(mask, foreground, background))
    return out


def split_trainable(params: dict) -> tuple[dict, dict]:
  """params -> (the three mechanisms' params, the frozen biggan_GT/u2net params)."""
  missing = [k for k in MECHANISMS + FROZEN if k not in params]
  if missing:
    raise KeyError(f"ImageNet CGN params lack {missing}; expected {MECHANISMS + FROZEN}")
  return ({k: params[k] for k in MECHANISMS}, {k: params[k] for k in FROZEN})


def assemble(biggan_variables: dict, u2net_variables: dict,
             mechanisms: dict[str, dict] | None = None) -> dict:
  """Variables of the whole CGN from one BigGAN and one U2-Net, as the authors initialise it:
  ``biggan_GT`` and every mechanism start as copies of the same pretrained BigGAN (``mechanisms``
  may override single ones, e.g. a fine-tuned checkpoint)."""
  mechanisms = mechanisms or {}
  out = {"params": {}, "batch_stats": {}}
  for name in ("biggan_GT",) + MECHANISMS:
    src = mechanisms.get(name, biggan_variables)
    out["params"][name] = src["params"]
    out["batch_stats"][name] = src["batch_stats"]
  out["params"]["u2net"] = u2net_variables["params"]
  out["batch_stats"]["u2net"] = u2net_variables["batch_stats"]
  return out


def config_from_fields(model: ml_collections.ConfigDict) -> CGNConfig:
  """The architecture named by a job config's ``model`` fields (output_dim, channel_width, layers,
  attention_layer_position, u2net_variant); empty ``layers`` means the published layout."""
  layers = tuple(tuple(l) for l in model.layers) or biggan_lib.PUBLISHED_LAYERS.get(model.output_dim)
  if layers is None:
    raise ValueError(f"config.model.output_dim={model.output_dim} has no published layout; "
                     f"set config.model.layers or use one of {sorted(biggan_lib.PUBLISHED_LAYERS)}")
  gan = BigGANConfig(output_dim=model.output_dim, channel_width=model.channel_width,
                     layers=tuple((bool(u), int(i), int(o)) for u, i, o in layers),
                     attention_layer_position=model.attention_layer_position)
  return CGNConfig(gan, model.u2net_variant)


def random_variables(cfg: CGNConfig, seed: int) -> dict:
  """The authors' initialisation with random instead of pretrained parts, for plumbing tests: one
  random BigGAN (from ``seed``) copied into all four generators, and a random U2-Net (``seed + 1``)."""
  gan = biggan_lib.init_variables(cfg.biggan, seed)
  size = cfg.biggan.output_dim
  mask_net = inits.host_random_variables(U2Net(cfg.u2net_variant), (jnp.zeros((1, size, size, 3)),),
                                         np.random.default_rng(seed + 1))
  return assemble(gan, mask_net)


def load(checkpoint: str, cache_dir: str | None = None,
         dtype: Any = jnp.float32) -> tuple[ImagenetCGN, dict]:
  """The whole CGN from a converted dir, a training job's export or the authors' ``cgn.pth``
  (converted once into ``cache_dir``; ``None`` is ``loading.default_cache_dir()``).

  Returns:
    ``(module, variables)``; ``module.config`` is the stored architecture.
  """
  variables, meta = loading.load_converted(checkpoint, "imagenet_cgn", cache_dir)
  return ImagenetCGN(CGNConfig.from_dict(meta["model_config"]), dtype=dtype), variables


def load_fixed_noise(path: str, z_dim: int) -> np.ndarray:
  """The authors' sheet noise ``u_fixed`` [1, z_dim] (already truncated) from .npy or their .pth.

  Their ``u_fixed.pth`` is one pickled tensor, not a state dict, so the converters' reader does not
  apply; torch is imported only for that format (``np.save`` it once to drop the dependency).
  """
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"fixed noise '{path}' not found; point --config.u_fixed at "
                            f"u_fixed.npy/.pth (shipped in the authors' imagenet/data/)")
  if path.endswith(".npy"):
    u = np.load(path)
  else:
    u = _load_torch_tensor(path)
  u = np.asarray(u, np.float32).reshape(-1, u.shape[-1])
  if u.shape[-1] != z_dim:
    raise ValueError(f"fixed noise '{path}' has dimension {u.shape[-1]}, the model expects {z_dim}")
  return u[:1]


def _load_torch_tensor(path: str) -> np.ndarray:
  """One tensor saved with ``torch.save`` (the authors' ``u_fixed.pth``), read without torch."""
  from converters import torch_reader  # pylint: disable=import-outside-toplevel
  return np.asarray(torch_reader.read(path))
