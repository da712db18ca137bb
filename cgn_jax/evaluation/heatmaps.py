"""Evidence heatmaps of a classifier: occlusion sensitivity, integrated gradients, IoU with a mask.

Both methods take any ``apply_fn(variables, images) -> logits`` (or log-probabilities, or a dict
of them, one per head: the ImageNet ensemble's shape / texture / background heads over one
backbone). ``variables`` is an argument rather than a closure so that a ResNet-50's weights are
traced, not baked into the compiled program as constants. ``apply_fn`` must treat the images of a
batch independently (BatchNorm in inference mode), since both methods batch many perturbed copies
of every image through one call.

The score explained is the target class's **log-probability** by default (``score="prob"``: the
probability). A confident classifier's probability saturates near 1, so occluding any single patch
barely moves it and the heat is flat except where one patch alone flips the decision; the
log-probability keeps moving with the logit margin and ranks the patches (computed with
``log1p``: float32 ``log_softmax`` rounds it to exactly 0 past a margin of ~17, as the colour-biased
MNIST CNN reaches on 2% of the test images). Log-softmax is idempotent, so ``apply_fn`` may return
either logits or log-probabilities (the MNIST CNN returns the latter). ``score="logit"`` explains the raw output instead (a linear
model's integrated gradients then have the closed form ``w * (x - x')``).

The heatmap's agreement with an object mask is the IoU of its top pixels with the mask
(:func:`heat_iou`), Re-CGN's quantitative check that a classifier trained on counterfactuals looks
at the digit rather than its colours.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cgn_jax.data import sheets
from cgn_jax.data.imagenet_cfs import atomic_write

Array = jax.Array
ApplyFn = Callable[[Any, Array], Any]
SCORES = ("log_prob", "prob", "logit")
RULES = ("trapezoid", "riemann_left", "riemann_right", "riemann_middle")
SIGNS = ("abs", "positive")


def mnist_apply_fn(model) -> ApplyFn:
  """The MNIST CNN (``models.classifiers.MnistCNN``) in inference mode: log-probabilities."""
  return lambda variables, images: model.apply(variables, images, train=False)


def ensemble_apply_fn(model, heads: tuple[str, ...] = ("shape_preds", "texture_preds",
                                                        "bg_preds")) -> ApplyFn:
  """The invariant ensemble's ``heads`` (keys of ``resnet.OUTPUT_KEYS``): one backbone pass, one
  heatmap per head. Inputs must be ImageNet-normalised, as for the ensemble itself."""
  def apply(variables, images):
    out = model.apply(variables, images, train=False)
    return {h: out[h] for h in heads}
  return apply


def _as_heads(out: Any) -> dict[str, Array]:
  return dict(out) if isinstance(out, Mapping) else {"": out}


def _unwrap(heads: dict[str, Any]) -> Any:
  return heads[""] if list(heads) == [""] else heads


def _targets(out: dict[str, Array], targets: Any) -> dict[str, Array]:
  """Per head (N,) int32 classes: the given ones (one array for every head, or a dict per head),
  or each head's own prediction when ``targets`` is None."""
  if targets is None:
    return {h: jnp.argmax(o, -1).astype(jnp.int32) for h, o in out.items()}
  if isinstance(targets, Mapping):
    return {h: jnp.asarray(targets[h], jnp.int32) for h in out}
  return {h: jnp.asarray(targets, jnp.int32) for h in out}


def _log_prob(logits: Array, targets: Array) -> Array:
  """(N,) log-probability of ``targets``, exact for a saturated classifier too.

  ``log_softmax`` computes ``log(1 + rest)`` with ``rest`` the other classes' share; once the
  margin exceeds ~17 that rounds to 0 in float32 and every occlusion drop of the top class is
  exactly 0. ``log1p(rest)`` keeps it (about ``-rest``), so the patches still rank.
  """
  # The shift is a constant; expm1 of the top class's shifted logit is exactly 0 but keeps its
  # derivative, so the gradient is log_softmax's (ties included).
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  is_top = jnp.arange(logits.shape[-1]) == jnp.argmax(logits, axis=-1)[:, None]
  rest = jnp.sum(jnp.where(is_top, jnp.expm1(shifted), jnp.exp(shifted)), axis=-1)
  return jnp.take_along_axis(shifted, targets[:, None], axis=-1)[:, 0] - jnp.log1p(rest)


def _scores(out: dict[str, Array], targets: dict[str, Array], score: str) -> dict[str, Array]:
  """(N,) score of the target class per head."""
  res = {}
  for h, o in out.items():
    o = o.astype(jnp.float32)
    if score == "logit":
      res[h] = jnp.take_along_axis(o, targets[h][:, None], axis=-1)[:, 0]
    else:
      s = _log_prob(o, targets[h])
      res[h] = jnp.exp(s) if score == "prob" else s
  return res


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def patch_masks(height: int, width: int, patch: int, stride: int) -> np.ndarray:
  """(P, H, W) float32 0/1 masks of every patch position, row-major; a last row / column of
  positions is added where the stride does not end on the border, so every pixel is covered."""
  if not 0 < patch <= min(height, width) or stride < 1:
    raise ValueError(f"occlusion patch {patch} / stride {stride} do not fit a {height}x{width} "
                     "image; need 0 < patch <= the image side and stride >= 1")

  def starts(n):
    s = list(range(0, n - patch + 1, stride))
    return s if s[-1] == n - patch else s + [n - patch]
  masks = []
  for y in starts(height):
    for x in starts(width):
      m = np.zeros((height, width), np.float32)
      m[y:y + patch, x:x + patch] = 1
      masks.append(m)
  return np.stack(masks)


def _chunked(n: int, chunk: int) -> tuple[int, int]:
  """(chunk, padded count): ``chunk`` <= 0 means all ``n`` at once."""
  c = n if chunk <= 0 else min(chunk, n)
  return c, -(-n // c) * c


def occlusion_fn(apply_fn: ApplyFn, *, patch: int = 4, stride: int = 2, baseline: Any = 0.0,
                 score: str = "log_prob", chunk: int = 0) -> Callable:
  """A jitted ``heat(variables, images, targets=None) -> (N, H, W)`` (a dict per head if
  ``apply_fn`` returns one) of occlusion sensitivity.

  A ``patch`` x ``patch`` square of ``baseline`` (a scalar or per-channel value in the model's
  input space) replaces the image at every ``stride``; a patch's heat is the drop of the target's
  score (``score(x) - score(x occluded)``, positive where the patch held evidence for the class),
  and a pixel's heat is the mean over the patches that cover it. ``targets=None`` explains each
  head's predicted class. ``chunk`` > 0 evaluates that many patch positions (times N images) per
  forward pass, bounding memory; 0 runs all positions at once.
  """
  _check("score", score, SCORES)

  @jax.jit
  def heat(variables, images, targets=None):
    n, h, w = images.shape[:3]
    masks = patch_masks(h, w, patch, stride)
    c, padded = _chunked(len(masks), chunk)
    # Padded positions occlude nothing; their rows are dropped below.
    stacked = np.concatenate([masks, np.zeros((padded - len(masks), h, w), np.float32)])
    value = jnp.asarray(baseline, images.dtype)
    out = _as_heads(apply_fn(variables, images))
    tgt = _targets(out, targets)
    ref = _scores(out, tgt, score)
    tiled = {k: jnp.tile(t, c) for k, t in tgt.items()}  # rows are position-major, image-minor

    def occluded(m):  # (c, H, W) -> {head: (c, N)}
      m = m[:, None, :, :, None].astype(images.dtype)
      x = images[None] * (1 - m) + value * m
      o = _as_heads(apply_fn(variables, x.reshape((c * n,) + images.shape[1:])))
      return {k: s.reshape(c, n) for k, s in _scores(o, tiled, score).items()}

    per_chunk = jax.lax.map(occluded, jnp.asarray(stacked).reshape(-1, c, h, w))
    cover = masks.sum(0)
    res = {}
    for k, s in per_chunk.items():
      drops = ref[k][None] - s.reshape(padded, n)[:len(masks)]
      res[k] = jnp.einsum("pn,phw->nhw", drops, jnp.asarray(masks)) / cover
    return _unwrap(res)

  return heat


def path_weights(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
  """(alphas, weights) of the quadrature of ``\\int_0^1 g(alpha) d alpha`` with ``steps``
  intervals: ``trapezoid`` (steps + 1 points, error O(1/steps^2)) or a Riemann sum (left, right or
  midpoint; the midpoint rule is also O(1/steps^2), left and right O(1/steps))."""
  _check("rule", rule, RULES)
  if steps < 1:
    raise ValueError(f"integrated gradients need steps >= 1, got {steps}")
  if rule == "trapezoid":
    w = np.full(steps + 1, 1.0 / steps)
    w[[0, -1]] = 0.5 / steps
    return np.linspace(0.0, 1.0, steps + 1), w
  offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
  return (np.arange(steps) + offset) / steps, np.full(steps, 1.0 / steps)


def integrated_gradients_fn(apply_fn: ApplyFn, *, steps: int = 32, rule: str = "trapezoid",
                            score: str = "log_prob", chunk: int = 0) -> Callable:
  """A jitted ``ig(variables, images, baselines=0., targets=None) -> (attributions, gap)``.

  ``attributions`` (N, H, W, C) are integrated gradients on the straight line from ``baselines``
  (broadcast to the images) to the images: ``(x - x') * \\int_0^1 grad score(x' + a (x - x')) da``,
  the integral by ``path_weights(steps, rule)``; ``gap`` (N,) is ``score(x) - score(x')``, which
  their sum over pixels and channels equals up to the quadrature error (completeness). A dict per
  head if ``apply_fn`` returns one; the heads share each forward pass (``jacrev`` over their
  scores). ``chunk`` > 0 evaluates that many path points (times N images) per pass.
  """
  _check("score", score, SCORES)
  alphas, weights = path_weights(steps, rule)
  c, padded = _chunked(len(alphas), chunk)
  # Padded points carry weight 0.
  alphas = np.concatenate([alphas, np.zeros(padded - len(alphas))]).astype(np.float32)
  weights = np.concatenate([weights, np.zeros(padded - len(weights))]).astype(np.float32)

  @jax.jit
  def ig(variables, images, baselines=0.0, targets=None):
    n = images.shape[0]
    base = jnp.broadcast_to(jnp.asarray(baselines, images.dtype), images.shape)
    out = _as_heads(apply_fn(variables, images))
    tgt = _targets(out, targets)
    tiled = {k: jnp.tile(t, c) for k, t in tgt.items()}
    diff = images - base

    def total(x):  # the sum over images of each head's score: image i's gradient is its own
      return {k: jnp.sum(s) for k, s in _scores(_as_heads(apply_fn(variables, x)), tiled,
                                                  score).items()}

    def accumulate(acc, aw):
      a, w = aw
      x = base[None] + a[:, None, None, None, None] * diff[None]
      g = jax.jacrev(total)(x.reshape((c * n,) + images.shape[1:]))
      return {k: acc[k] + jnp.einsum("c,cnhwk->nhwk", w, g[k].reshape((c,) + images.shape))
              for k in acc}, None

    zero = {k: jnp.zeros(images.shape, jnp.float32) for k in out}
    acc, _ = jax.lax.scan(accumulate, zero, (jnp.asarray(alphas).reshape(-1, c),
                                             jnp.asarray(weights).reshape(-1, c)))
    ref = _scores(out, tgt, score)
    at_base = _scores(_as_heads(apply_fn(variables, base)), tgt, score)
    return (_unwrap({k: diff * acc[k] for k in acc}),
            _unwrap({k: ref[k] - at_base[k] for k in ref}))

  return ig


# -- agreement with a mask -------------------------------------------------------------------------


def top_k_mask(heat: np.ndarray, k: np.ndarray) -> np.ndarray:
  """(N, H, W) bool: the ``k[i]`` highest-heat pixels of image i (ties: the first in raster
  order), so every image selects exactly its own count."""
  heat = np.asarray(heat, np.float64)
  n = heat.shape[0]
  flat = heat.reshape(n, -1)
  order = np.argsort(-flat, axis=1, kind="stable")
  rank = np.empty_like(order)
  rank[np.arange(n)[:, None], order] = np.arange(flat.shape[1])[None]
  return (rank < np.asarray(k).reshape(n, 1)).reshape(heat.shape)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N,) intersection over union of boolean (N, ...) masks; 1 where both are empty."""
  a, b = np.asarray(a, bool).reshape(len(a), -1), np.asarray(b, bool).reshape(len(b), -1)
  inter, union = (a & b).sum(1), (a | b).sum(1)
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def heat_iou(heat: np.ndarray, mask: np.ndarray, fraction: float = 0.0,
             sign: str = "abs") -> np.ndarray:
  """(N,) IoU between a heatmap's top pixels and ``mask`` (N, H, W) bool.

  There are as many top pixels as the mask has (``fraction`` = 0), so the IoU is 1 exactly when
  the heat ranks the mask's pixels first, and no threshold on the heat's scale (which differs
  between methods and images) is needed; ``fraction`` > 0 takes that share of the pixels instead.
  ``sign="abs"`` ranks by magnitude: evidence of either sign, since for a shape classifier the
  background pixels that bound a stroke can matter as much as the stroke. ``"positive"`` ranks by
  the signed heat: the evidence *for* the class, as Grad-CAM (whose ReLU keeps only that) shows.
  """
  _check("sign", sign, SIGNS)
  mask = np.asarray(mask, bool)
  k = (np.full(len(mask), round(fraction * mask[0].size)) if fraction > 0
       else mask.reshape(len(mask), -1).sum(1))
  heat = np.asarray(heat)
  return iou(top_k_mask(np.abs(heat) if sign == "abs" else heat, k), mask)


def chance_iou(mask: np.ndarray, fraction: float = 0.0) -> np.ndarray:
  """(N,) the IoU that :func:`heat_iou` expects of a heatmap unrelated to the mask (a uniformly
  random ranking; the ratio of the expected intersection and union)."""
  mask = np.asarray(mask, bool).reshape(len(mask), -1)
  m, p = mask.sum(1), mask.shape[1]
  k = np.full(len(mask), round(fraction * p)) if fraction > 0 else m
  inter = k * m / p
  return inter / np.maximum(k + m - inter, 1e-12)


# -- pictures --------------------------------------------------------------------------------------

# A dark-to-bright sequential map (black, purple, red, orange, pale yellow): brightness rises
# monotonically, so the order of the heat survives a grey-scale print.
_ANCHORS = np.array([(0.0, 0.0, 0.02), (0.34, 0.06, 0.43), (0.73, 0.21, 0.33), (0.96, 0.49, 0.07),
                     (0.99, 0.96, 0.62)], np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
  """values in [0, 1] (any shape) -> RGB in [0, 1] (shape + (3,)), piecewise linear."""
  v = np.clip(np.asarray(values, np.float32), 0, 1) * (len(_ANCHORS) - 1)
  i = np.minimum(v.astype(np.int32), len(_ANCHORS) - 2)
  t = (v - i)[..., None]
  return _ANCHORS[i] * (1 - t) + _ANCHORS[i + 1] * t


def normalize_heat(heat: np.ndarray, quantile: float = 0.99) -> np.ndarray:
  """|heat| per image scaled to [0, 1] by its ``quantile`` (one outlier pixel does not wash out
  the rest of the map)."""
  a = np.abs(np.asarray(heat, np.float32))
  top = np.quantile(a.reshape(len(a), -1), quantile, axis=1).reshape((-1,) + (1,) * (a.ndim - 1))
  return np.clip(a / np.maximum(top, 1e-12), 0, 1)


def overlay(images: np.ndarray, heat: np.ndarray) -> np.ndarray:
  """The heat over the images: NHWC [-1, 1] images, (N, H, W) heat -> NHWC [-1, 1] RGB. Cold
  pixels show the image dimmed, hot ones the colour map (opacity = the normalised heat)."""
  h = normalize_heat(heat)
  x = (np.asarray(images, np.float32) + 1) / 2
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  a = h[..., None]
  return (0.6 * x * (1 - a) + colormap(h) * a) * 2 - 1


def heat_image(heat: np.ndarray) -> np.ndarray:
  """(N, H, W) heat -> NHWC [-1, 1] RGB of the colour map alone."""
  return colormap(normalize_heat(heat)) * 2 - 1


def sheet_rows(images: np.ndarray, columns: Mapping[str, np.ndarray],
               masks: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
  """(N, K, H, W, 3) cells for ``sheets.save_image_grid`` and their K column names: the image,
  the mask if given, then an overlay per heatmap in ``columns`` (name -> (N, H, W))."""
  x = np.asarray(images, np.float32)
  x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
  cells, names = [x], ["image"]
  if masks is not None:
    cells.append(np.repeat(np.asarray(masks, np.float32)[..., None] * 2 - 1, 3, axis=-1))
    names.append("mask")
  for name, heat in columns.items():
    cells.append(overlay(x, heat))
    names.append(name)
  return np.stack(cells, axis=1), names


# The files of both heatmap jobs (explain_classifier, explain_ensemble), in their workdir.
RESULTS = "results.json"
SHEET = "heatmaps.png"
ARRAYS = "heatmaps.npz"


def write_outputs(workdir: str, cells: np.ndarray, scale: int, arrays: Mapping[str, np.ndarray],
                  results: dict) -> None:
  """The sheet (``cells`` [rows, cols, H, W, 3]), every heatmap (so other thresholds or masks need
  no second run) and results.json, each under a temp name then renamed, results.json last."""
  sheets.save_image_grid(os.path.join(workdir, SHEET), cells.reshape((-1,) + cells.shape[2:]),
                         nrow=cells.shape[1], scale=scale)
  atomic_write(os.path.join(workdir, ARRAYS), lambda f: np.savez_compressed(f, **arrays))
  text = json.dumps(results, indent=1)
  atomic_write(os.path.join(workdir, RESULTS), lambda f: f.write(text.encode()))
  for name in (ARRAYS, RESULTS):  # mkstemp's 0600 would hide them from other users
    os.chmod(os.path.join(workdir, name), 0o644)
