"""torchvision's Bottleneck ResNet (ResNet-50/101/152) and the authors' InvariantEnsemble in Flax.

The ensemble (imagenet/models/classifier_ensemble.py) is a ResNet without its ``fc`` plus three
linear heads, one per factor of variation (shape, texture, background); its output dict keeps the
authors' key names (``shape_preds``, ..., see ``OUTPUT_KEYS``) because their training and
evaluation code (and ours, mirroring it) index the dict by them.

Traps of the torch original:

* No input normalisation inside the model: the authors' data loaders apply the ImageNet
  mean/std (``transforms.Normalize``) before the forward, so callers must too.
* The authors train the ensemble with every BatchNorm in eval mode (``model.apply(set_bn_eval)``
  after ``model.train()`` in imagenet/train_classifier.py): reproducing their training means
  calling with ``train=False``; ``train=True`` is plain torchvision training.
* torchvision v1.5: the stride of a Bottleneck sits on the 3x3 ``conv2``, not on ``conv1``.

Parameter names follow torchvision's modules (``conv1``, ``bn1``, ``layer1_0/conv2``,
``layer1_0/downsample_conv``, ``fc``; the ensemble adds ``backbone/`` and ``m_shape`` ...), so the
converter's mapping reads like the checkpoint. Layout NHWC; parameters are float32 whatever ``dtype``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cgn_jax import checkpoints
from cgn_jax.models import init as inits
from cgn_jax.models import loading
from cgn_jax.models.layers import TorchBatchNorm, max_pool_torch

Array = jax.Array

EXPANSION = 4  # Bottleneck output channels = 4 * planes
# torchvision's ResNet.__init__: kaiming_normal_(mode="fan_out", nonlinearity="relu") on every conv
# (an untruncated normal, std sqrt(2 / (out * kh * kw))); BN weight 1 / bias 0; Linear untouched.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The authors' forward() returns these keys; avg is the mean of the three logits, shape_texture
# the prediction without the background head.
OUTPUT_KEYS = ("shape_preds", "texture_preds", "bg_preds", "avg_preds", "shape_texture_preds")
HEADS = ("m_shape", "m_texture", "m_bg")


def num_features(width: int) -> int:
  """Channels after the last stage (2048 for ResNet-50): planes 8*width times the expansion."""
  return 8 * width * EXPANSION


def _torch_linear(features: int, fan_in: int, name: str) -> nn.Dense:
  """nn.Linear with torch's default init; float32, because logits feed a softmax and the heads
  are < 0.1% of the FLOPs."""
  return nn.Dense(features, name=name, kernel_init=inits.kernel_init("torch_default", 0),
                  bias_init=inits.bias_init("torch_default", fan_in))


class Bottleneck(nn.Module):
  """torchvision Bottleneck: 1x1 -> 3x3 (stride here) -> 1x1 (4*planes), residual, ReLU."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=CONV_INIT)
    bn = functools.partial(TorchBatchNorm, momentum=0.1, epsilon=1e-5)
    out = nn.relu(bn(name="bn1")(conv(self.planes, (1, 1), padding=0, name="conv1")(x), train))
    out = conv(self.planes, (3, 3), strides=self.stride, padding=1, name="conv2")(out)
    out = nn.relu(bn(name="bn2")(out, train))
    out = bn(name="bn3")(conv(self.planes * EXPANSION, (1, 1), padding=0, name="conv3")(out), train)
    if self.downsample:
      x = conv(self.planes * EXPANSION, (1, 1), strides=self.stride, padding=0,
               name="downsample_conv")(x)
      x = bn(name="downsample_bn")(x, train)
    return nn.relu(out + x)


class ResNet(nn.Module):
  """torchvision ``ResNet(Bottleneck, blocks)`` with stem and stage widths scaled by ``width``/64.

  ``include_top=False`` returns the (N, 32*width) pooled features, i.e. the authors' ensemble
  backbone (``children()[:-1]``) flattened.
  """
  blocks: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  num_classes: int = 1000
  dtype: Any = jnp.float32
  include_top: bool = True

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = x.astype(self.dtype)
    x = nn.Conv(self.width, (7, 7), strides=2, padding=3, use_bias=False, dtype=self.dtype,
                kernel_init=CONV_INIT, name="conv1")(x)
    x = nn.relu(TorchBatchNorm(momentum=0.1, epsilon=1e-5, name="bn1")(x, train))
    x = max_pool_torch(x, 3, 2, padding=1)  # -inf padding, as torch
    cin = self.width
    for stage, n in enumerate(self.blocks):
      planes = self.width * 2 ** stage
      for j in range(n):
        stride = 2 if stage > 0 and j == 0 else 1
        x = Bottleneck(planes, stride, downsample=j == 0 and (stride != 1 or cin != planes * EXPANSION),
                       dtype=self.dtype, name=f"layer{stage + 1}_{j}")(x, train)
        cin = planes * EXPANSION
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # AdaptiveAvgPool2d(1) + flatten
    if not self.include_top:
      return x
    return _torch_linear(self.num_classes, x.shape[-1], "fc")(x)


class InvariantEnsemble(nn.Module):
  """The authors' InvariantEnsemble(arch, cut=1): a shared backbone and shape/texture/bg heads.

  Each head is a Linear(32*width -> num_classes) with torch's default init, drawn separately (the
  authors take the fc of three freshly built models). Returns a dict keyed by ``OUTPUT_KEYS``.
  """
  blocks: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  num_classes: int = 1000
  dtype: Any = jnp.float32

  def setup(self):
    self.backbone = ResNet(self.blocks, self.width, self.num_classes, self.dtype, include_top=False)
    fan_in = num_features(self.width)
    self.m_shape = _torch_linear(self.num_classes, fan_in, "m_shape")
    self.m_texture = _torch_linear(self.num_classes, fan_in, "m_texture")
    self.m_bg = _torch_linear(self.num_classes, fan_in, "m_bg")

  def features(self, x: Array, train: bool = False) -> Array:
    """The pooled backbone features, (N, 32*width) float32."""
    return self.backbone(x, train)

  def heads(self, feats: Array) -> dict[str, Array]:
    """The output dict from pooled features (``init`` with this method draws only the heads)."""
    shape, texture, bg = self.m_shape(feats), self.m_texture(feats), self.m_bg(feats)
    return {"shape_preds": shape, "texture_preds": texture, "bg_preds": bg,
            "avg_preds": (shape + texture + bg) / 3, "shape_texture_preds": (shape + texture) / 2}

  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    return self.heads(self.features(x, train))


def ensemble_from_fields(model: Any) -> InvariantEnsemble:
  """The ensemble a config's ``model`` section describes (blocks, width, num_classes, dtype)."""
  return InvariantEnsemble(blocks=tuple(model.blocks), width=model.width,
                           num_classes=model.num_classes, dtype=jnp.dtype(model.dtype))


# Where the training job exports its final ensemble inside its workdir (the evaluation job looks there).
EXPORT_DIR = "ensemble"

MODULES: dict[str, type[nn.Module]] = {"resnet50": ResNet, "invariant_ensemble": InvariantEnsemble}


def init_variables(model: nn.Module, key: Array, image_size: int = 224) -> Any:
  """Fresh torchvision-initialised variables of a ``ResNet`` or ``InvariantEnsemble``.

  Compiling this takes ~20 s on a 2-core CPU whatever the size (XLA's random-bit generation for
  every array; eager ``init`` is no faster), so CPU tests start from converted weights instead.
  """
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(functools.partial(model.init, train=False))(key, x)


def ensemble_from_resnet(resnet_variables: Mapping[str, Any], key: Array,
                         model: InvariantEnsemble) -> Any:
  """Ensemble variables whose backbone is a (converted torchvision) ResNet's and whose heads are new.

  This is the authors' ``InvariantEnsemble(arch, pretrained=True)``: the backbone comes from the
  pretrained model, its ``fc`` is dropped, and the three heads are freshly initialised.
  """
  backbone = {"params": {k: v for k, v in resnet_variables["params"].items() if k != "fc"},
              "batch_stats": resnet_variables["batch_stats"]}
  want = jax.eval_shape(functools.partial(model.init, method="features"), key,
                        jnp.zeros((1, 32, 32, 3)))
  shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(a.shape), t)
  if shapes(backbone) != shapes({c: want[c]["backbone"] for c in want}):
    raise ValueError("the ResNet's variables do not fit the ensemble's backbone (blocks or width differ)")
  # Same key and module path as a full init, so these are the heads init_variables would draw.
  heads = jax.jit(functools.partial(model.init, method="heads"))(
      key, jnp.zeros((1, num_features(model.width))))["params"]
  return {"params": {"backbone": backbone["params"], **heads},
          "batch_stats": {"backbone": backbone["batch_stats"]}}


def load(checkpoint: str, cache_dir: str | None = None, family: str | None = None,
         **module_kwargs: Any) -> tuple[nn.Module, Any]:
  """A ResNet or InvariantEnsemble and its variables, from a converted dir or a ``.pth``.

  Args:
    checkpoint: a converted directory, or a ``.pth`` (torchvision ResNet state dict, or the
      authors' ensemble checkpoint, bare or ``{'state_dict': ...}``, with or without ``module.``).
    cache_dir: where a ``.pth`` is converted to; ``None`` is ``loading.default_cache_dir()``.
    family: ``resnet50`` or ``invariant_ensemble``. A directory knows its own (``None``: take it);
      a ``.pth`` does not (``None`` means ``invariant_ensemble``, the authors' file).
    **module_kwargs: module fields other than the stored architecture, e.g. ``dtype``.

  Returns:
    ``(module, variables)``, the module built from the stored ``model_config``.
  """
  family = loading.pick_family(checkpoint, family, MODULES, "invariant_ensemble", "cgn_jax.models.resnet")
  variables, meta = loading.load_converted(checkpoint, family, cache_dir)
  cfg = dict(meta["model_config"])
  cfg["blocks"] = tuple(cfg["blocks"])  # JSON gives a list
  return MODULES[family](**cfg, **module_kwargs), variables


def load_model(config: Any, workdir: str) -> tuple[nn.Module, Any, str]:
  """``(module, variables, description)`` of a classifier job's ``config.checkpoint``.

  The checkpoint is a ``train_classifier_imagenet`` workdir (its exported ``ensemble/``, else its
  newest training checkpoint, built from ``config.model``), a converted dir, or a ``.pth``
  (converted into ``<workdir>/converted``; ``config.family`` names a torchvision ResNet's). Empty
  with ``config.allow_random_init``: a fresh ``config.model`` ensemble (seed ``config.seed``).
  Shared by the jobs that read a classifier (evaluation, heatmaps).
  """
  path = config.checkpoint
  dtype = jnp.dtype(config.model.dtype)
  cache = os.path.join(workdir, "converted")
  if not path:
    if not config.allow_random_init:
      raise checkpoints.CheckpointError(
          "config.checkpoint is empty; pass --config.checkpoint=PATH (a training workdir, a "
          "converted dir or a .pth), or --config.allow_random_init=True to evaluate a random model")
    model = ensemble_from_fields(config.model)
    return model, init_variables(model, jax.random.key(config.seed),
                                 config.data.image_size), "random initialisation"
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.checkpoint={path} does not exist; pass a training workdir, "
                            f"a converted dir or a .pth")
  if os.path.isdir(os.path.join(path, EXPORT_DIR)):
    path = os.path.join(path, EXPORT_DIR)
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, checkpoints.META_FILE)):
    if not os.path.isdir(os.path.join(path, "checkpoints")):
      raise checkpoints.CheckpointError(f"{path} is neither a training workdir, nor a converted "
                                        f"checkpoint; pass one of those or a .pth")
    tree, _ = checkpoints.read_train_checkpoint(path)
    model = ensemble_from_fields(config.model)
    variables = {"params": tree["state"]["params"], "batch_stats": tree["state"]["batch_stats"]}
    return model, variables, f"{path} (training checkpoint, step {tree['state']['step']})"
  model, variables = load(path, cache, family=config.family or None, dtype=dtype)
  return model, variables, path
