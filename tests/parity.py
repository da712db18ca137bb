"""Fixture-driven parity checks: the arrays a fixture holds decide what is compared, at what tolerance.

A parity test declares, for one fixture family, which keys are inputs or configuration (regexes) and
a list of ``Rule``s: a regex over output keys, the name of its tolerance in ``TOLERANCES``, and a
function returning the port's value for a matched key, in the fixture's layout (NCHW, torch shapes).
``check_fixture`` then compares every output array present in the fixture file:

* a key that is neither an input nor matched by a rule fails the test, naming the key, so an array
  added to a fixture is never silently ignored;
* a fixture holding fewer arrays than the shared one is checked on the arrays it has (the port
  values are computed lazily, per key); an input that a present output needs but the file lacks is a
  failure naming both, never a bare ``KeyError``;
* all differing arrays are reported at once, each with its error, tolerance and the torch-vs-torch
  noise the tolerance was derived from.

``TOLERANCES`` is the one table of parity tolerances. Each entry cites the noise measured by
recomputing the torch references with 1 instead of 2 intra-op threads (fixtures README,
"Reproducibility / tolerances observed"): a port cannot be expected to be closer to torch than torch
is to itself, and the margin above that noise is what a different (XLA) evaluation order needs. The
self-consistency checks (two paths of the port that must agree) have their entries at the end, each
derived from the measured difference of the two paths and the float32 rounding of the quantity.

Set ``CGN_PARITY_REPORT=1`` to print the measured max error of every compared array at the end of
the test session.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7: one ulp at 1.0


@dataclasses.dataclass(frozen=True)
class Tol:
  """Elementwise bound ``|port - ref| <= atol + rtol*|ref| + scale_rtol*scale + sum_ulps*eps*sumabs``.

  ``scale`` defaults to max|ref|: the criterion for arrays whose float32 noise is set by their
  largest values (the MNIST raw shape map reaches |x|~12). ``sumabs`` is Σ|terms| of a sum (given by
  the caller), for the classic bound on reassociating a float32 sum. ``noise`` is the torch 1-vs-2
  thread max |diff| from the README (None where the README gives none for this quantity).
  """
  atol: float
  rtol: float = 0.0
  scale_rtol: float = 0.0
  sum_ulps: float = 0.0
  noise: float | None = None

  def describe(self) -> str:
    parts = [f"atol={self.atol:g}"]
    parts += [f"{n}={getattr(self, n):g}" for n in ("rtol", "scale_rtol", "sum_ulps") if getattr(self, n)]
    if self.noise is not None:
      parts.append(f"torch-vs-torch noise {self.noise:g}")
    return ", ".join(parts)


EXACT = Tol(0.0)

TOLERANCES: dict[str, Tol] = {
    # ---- MNIST CGN (README: <= 4.7e-6 over the whole fixture, reached in f_shape, |x| up to ~12;
    # the texture outputs <= 8e-7). The README's suggested start: atol 1e-5, rtol for large values.
    # f_shape: 4.7e-6 at |x|~12 is 4e-7 of the array's scale; its last instance norm divides by a
    # small per-sample std, and torch itself lands 1.2e-5 away from a float64 evaluation of the same
    # weights (1e-6 of the scale). Hence 1e-5 absolute plus 1e-5 of max|f_shape| (25x the noise).
    "mnist_cgn/f_shape": Tol(1e-5, scale_rtol=1e-5, noise=4.7e-6),
    # The clamp inherits the raw map's error, so the same criterion with f_shape's scale (the rule
    # passes max|f_shape| as the scale; the clamped values themselves are <= 1).
    "mnist_cgn/mask_clamped": Tol(1e-5, scale_rtol=1e-5, noise=4.7e-6),
    # tanh outputs in [-1, 1]: 8e-7 measured -> the README's 1e-5 (12x).
    "mnist_cgn/f_text": Tol(1e-5, noise=8e-7),
    # label_emb is a gather and the input vector a concatenation; Patch2Image a tiling: no
    # arithmetic, so bit-exact (torch-vs-torch 0).
    "mnist_cgn/copy": EXACT,
    # BatchNorm running mean/var after one train call: the same layers' activations, at the MNIST
    # CGN noise (<= 4.7e-6); running variances reach ~10, hence the rtol (README: rtol 1e-5 for
    # large-valued arrays). num_batches_tracked is an integer counter: exact.
    "mnist/bn_running": Tol(1e-5, rtol=1e-5, noise=4.7e-6),
    "mnist/bn_count": EXACT,
    # Discriminators and classifier logits/log-probs (README: DiscConv <= 6e-8, DiscLin and CNN 0):
    # torch is (nearly) deterministic here; 1e-5 is the README's start, the room an XLA reduction
    # order needs on |x| ~ 1-10 logits.
    "disc_lin/out": Tol(1e-5, noise=0.0),
    "disc_conv/out": Tol(1e-5, noise=6e-8),
    "mnist_classifier/out": Tol(1e-5, noise=0.0),

    # ---- MNIST CGN training step (README section 10). The README's torch 1-vs-2-thread noise
    # (losses <= 2e-9, step-1 gradients <= 9e-7 G / 1.2e-7 D, state <= 3e-6) understates how far
    # the float32 reference itself is from exact arithmetic here: torch's step-1 x_gen is 4.3e-6
    # from a float64 evaluation (the port in x64), and in sample 13 that is enough to move a D
    # LeakyReLU across its kink. The authors' DiscConv in torch float64 reproduces the fixture's
    # D gradients to 5e-7 from the fixture's x_gen, but lands 8.4e-6 away from the exact x_gen,
    # and dL_adv/dx of sample 13 changes by 7.8e-6 (0.3% of its max; every other sample 4e-9).
    # Measured port-vs-fixture: step-1 losses <= 6e-8; x_gen 1.2e-5 (float32 port; 1.0e-5 from
    # its own float64 run); gradients <= 2.6e-3 of each array's max|g| in float32 and float64
    # alike, i.e. the reference's kink, not the port's rounding. Hence:
    # x_gen: the two measured errors summed (1.5e-5), 2x.
    "train_step/x_gen": Tol(3e-5, noise=None),
    # Scalar losses (values 2e-4 .. 0.8, measured <= 1.2e-7): the README's rtol 1e-5.
    "train_step/loss": Tol(1e-8, rtol=1e-5, noise=2e-9),
    # Step-1 gradients: 5e-3 of the array's max|g| (2x the reference's own 2.6e-3). A mask-loss
    # weight 3% off (0.31 for 0.3) already fails f_shape.5/10 by up to 1.4x this bound.
    "train_step/grad_g": Tol(0.0, scale_rtol=5e-3, noise=9e-7),
    "train_step/grad_d": Tol(0.0, scale_rtol=5e-3, noise=1.2e-7),
    # Conv biases feeding a BatchNorm: the true gradient is 0; torch and the port give <= 5e-8.
    "train_step/bn_fed_bias_grad": Tol(1e-6, noise=None),
    # State after step 2, the step taken from the reference's step-1 state: measured <= 3.8e-6
    # (running variances up to 36), the README's 1e-5 / rtol 1e-5 (noise 3e-6).
    "train_step/state": Tol(1e-5, rtol=1e-5, noise=3e-6),
    # The BN-fed biases after that step: Adam turns their noise gradient into +-lr, so two
    # independent float evaluations differ by up to 2*lr (README: 3.7e-4 torch-vs-torch over two
    # steps; measured 1.5e-4 over the one step the port takes).
    "train_step/bn_fed_bias": Tol(2 * 2e-4, noise=3.7e-4),

    # ---- BigGAN-deep w16 (README: dbg_layer0_out 9e-7, dbg_layer1_out 4e-6, attention output
    # 1.3e-4, final image <= 1.1e-4; the w8 model of the held-out set 5e-4). BigGAN amplifies float
    # noise (softmax, |x|~60 residual stream, cancellation in conv_to_rgb).
    # The statistics-row selection is Python float64 arithmetic, reproduced bit for bit.
    "biggan/stat_selection": EXACT,
    # gen_z output and the first two GenBlocks: <= 4e-6 measured -> the README's 1e-5 (2.5x).
    "biggan/dbg_early": Tol(1e-5, noise=4e-6),
    # SelfAttn input/output crops: after the softmax torch already moves by 1.3e-4 -> 1e-3 (8x).
    "biggan/dbg_attn": Tol(1e-3, noise=1.3e-4),
    # Images (full, crops, 4x-subsampled): 1.1e-4 (w16), 5e-4 (w8) -> the README's 2e-3 (4x w8).
    "biggan/image": Tol(2e-3, noise=1.1e-4),
    # Per-channel sums over H*W pixels, compared as means per pixel (sum / (H*W)): the image noise
    # is ~1e-4 per pixel at worst and mostly cancels in a sum, so 1e-4 on the mean bounds the sum
    # by H*W x the per-pixel noise (float64 sums on both sides).
    "biggan/image_mean": Tol(1e-4, noise=1.1e-4),
    # Spectral-norm u/v after one power iteration: unit vectors computed from the weights alone
    # (no activations), so at most the early-activation noise (README gives none for u/v itself;
    # dbg_layer0_out 9e-7) -> 1e-5, the same as the early activations.
    "biggan/sn_uv": Tol(1e-5, noise=None),

    # ---- U2NETP (README: <= 6e-8 for every stored map, |x| <= 1): the README's 1e-5 / rtol 1e-5.
    "u2netp/map": Tol(1e-5, rtol=1e-5, noise=6e-8),

    # ---- ResNet / InvariantEnsemble (README: invariant ensemble <= 4e-7). Backbone features reach
    # |x| ~ 4, logits ~ 1: the README's 1e-5 (measured <= 1.1e-6, at the backbone output).
    "resnet/out": Tol(1e-5, noise=4e-7),
    # ResNet-50 / small ResNets on random weights against a torch.nn.functional forward computed
    # in the test (no fixture; torch 1-vs-2 threads measured there: 1.2e-7 on features |x| <= 1.1
    # and logits <= 0.9, 2.7e-7 in train mode). Measured port error <= 8.7e-7 -> 1e-5.
    "resnet/random_weights": Tol(1e-5, noise=1.2e-7),
    # Running mean/var after one train-mode call (variances up to ~1.5; torch 1-vs-2 threads
    # 1.2e-7, port 1.2e-7): the README's atol 1e-5 + rtol 1e-5.
    "resnet/bn_running": Tol(1e-5, rtol=1e-5, noise=1.2e-7),

    # ---- VGG16 features and perceptual losses (README: VGG losses <= 1e-8). Hooked ReLU features
    # reach |x| ~ 10: README's atol 1e-5 + rtol 1e-5. Grams are large-valued sums of products
    # (README: rtol 1e-5 for grams), with an atol of 1e-9 only for exact zeros. Loss values and
    # terms range 1e-6 .. 1: rtol 1e-5 with a 1e-6 floor (100x the 1e-8 noise).
    "vgg/features": Tol(1e-5, rtol=1e-5, noise=None),
    "vgg/gram": Tol(1e-9, rtol=1e-5, noise=None),
    "vgg/loss": Tol(1e-6, rtol=1e-5, noise=1e-8),
    # Which ReLUs are hooked is configuration, compared exactly.
    "vgg/config": EXACT,

    # ---- losses.npz (README: losses / SSIM torch-vs-torch 0). Values up to ~1.9e3
    # (backgroundloss, binary_w300): the README's atol 1e-5 + rtol 1e-5 for large-valued arrays.
    "losses/value": Tol(1e-5, rtol=1e-5, noise=0.0),
    "losses/gram": Tol(1e-9, rtol=1e-5, noise=0.0),
    # get_all_patches is pure indexing: bit-exact.
    "losses/patches": EXACT,

    # ---- Inception-v3, torchvision and FID graphs (README §9 suggests atol 1e-4 on logits, 1e-5
    # on pool3 / Mixed_*; its noise: torch 1-vs-2 threads 4.4e-5 on logits). That noise understates
    # how far the float32 reference is from exact arithmetic in this random, BN-calibrated network:
    # against float64 evaluations of the same weights (torch float64 and the port in float64 agree
    # to 1e-12 on both graphs) the fixture is 3.0e-5 off on Mixed_5d, 3.6e-4 on Mixed_6e, 2.6e-4 on
    # pool3 and 3.4e-4 on logits (FID graph; torchvision graph 1.8e-4), and torch 2.14 float32 on
    # another machine lands 5.4e-4 from the fixture's logits. The float32 port is as far from
    # float64 (4.9e-5, 4.3e-4, 3.0e-4, 4.5e-4). Bounds: the two distances summed, 2.5x. A mixed-up
    # graph moves the logits by up to 10.6; count_include_pad wrong in Mixed_5b alone moves
    # Mixed_5d by 1.7 and the logits by 2.3.
    "inception/Mixed_5d": Tol(2e-4, noise=None),
    "inception/Mixed_6e": Tol(2e-3, noise=None),
    "inception/pool3": Tol(1.5e-3, noise=None),
    "inception/logits": Tol(2e-3, noise=4.4e-5),
    # Bilinear resize 256 -> 299 in [0, 1]: the README's 1e-6. Measured 1.2e-7 on the host (numpy),
    # 1.8e-7 under XLA: one ulp where torch fuses a lerp's multiply-add (its weights are matched
    # exactly, FMA included; rounding them separately gave 5.4e-7).
    "inception/resize": Tol(1e-6, noise=None),

    # ---- Self-consistency: two paths of the port that must agree (no torch involved).
    # BigGAN with a traced truncation vs the Python-float (StatSelection) model: measured bit-
    # identical (0.0) at t = 0.405, 0.5, 0.28 on CPU, because the in-graph selection weights equal
    # the host float64 ones bit for bit (test_traced_selection_equals_python_float64) and the row
    # mix adds only exact zeros. 1e-6 (8 ulp of the |x| <= 1 tanh image) leaves room for a
    # different fusion of the last ops only: a one-ulp change of one selection weight (t = 0.28,
    # weight 6e-8 on the neighbouring row) already moves the image by 4.3e-3, a wrong row by 1.9.
    "self/biggan_traced_truncation": Tol(1e-6),
    # Traced weighted-row sum vs static indexed rows: measured bit-identical (0 ulp) for the seven
    # truncations of the test; 2e-7 relative (<= 2 ulp) admits a fused multiply-add in either
    # path (one rounding instead of two).
    "self/biggan_row_mix": Tol(0.0, rtol=2e-7),
    # bf16 vs float32 BigGAN image, relative L2: each GenBlock's four bf16 convolutions add ~1%
    # (measured 1% after the first block, 10.6% at the w16 image after 12 blocks + attention);
    # a broken cast gives ~100%. Bound: 0.2 (the rule reads atol as the relative L2 bound).
    "self/biggan_bf16_rel_l2": Tol(0.2),
    # Sub-pixel (phase) upsample+conv vs nearest upsample then 3x3 conv: both are float32 sums of
    # the same 9*C_in products in a different association. Measured against float64: each path
    # <= 1.48 eps*Σ|terms|, the two apart <= 1.12 eps*Σ|terms| (shapes (2,8,8,5), (1,5,7,3),
    # (2,16,16,64), (4,8,8,128)); bound 2 eps*Σ|terms| per element (~1.8x margin), which is
    # tighter than the former atol=rtol=1e-5 on every element of the test's shapes.
    "self/subpixel_conv": Tol(0.0, sum_ulps=2.0),
    # U2Net fusion rebuilt with torch (bilinear align_corners=True + 1x1 conv) from our side maps:
    # measured 3.0e-8 at |d0| <= 0.46 (torch float32 itself is 3.4e-8 from float64) -> the U2NETP
    # parity tolerance.
    "self/u2net_fusion": Tol(1e-5, rtol=0.0, noise=6e-8),
    # bf16 vs float32 U2NETP maps, relative L2: measured 0.55% (stage3), 0.48% (stage3d), 0.21%
    # (d0 logits); bf16 rounds each op by up to 2^-8 = 0.39%. Bound 2e-2 (3.6x the worst).
    "self/u2net_bf16_rel_l2": Tol(2e-2),
    # bf16 vs float32 U2NETP sigmoid output, max |diff|: measured 4.1e-4 -> 5e-3.
    "self/u2net_bf16_out": Tol(5e-3),
    # bf16 vs float32 InvariantEnsemble outputs, relative L2: measured 0.6% (shape) .. 0.96%
    # (texture) on the width-8 fixture, 0.34% on a random ResNet-50; a broken cast gives ~100%.
    # Bound 5e-2 (5x the worst).
    "self/resnet_bf16_rel_l2": Tol(5e-2),
}


class ParityError(AssertionError):
  """A port value differs from the fixture, or the fixture cannot be compared (key named)."""


REPORT: list[tuple[str, str, str, float, Tol]] = []  # (fixture, key, tolerance name, max err, tol)


def compare(actual: Any, expected: Any, tol: Tol | str, name: str, scale: float | None = None,
            sumabs: Any = None) -> float:
  """Checks one array against ``tol`` (a ``Tol`` or a name in ``TOLERANCES``); returns max |diff|.

  Raises:
    ParityError: shapes differ, or some element exceeds the bound; the message names ``name``, the
      worst error and where it is, and the tolerance with its torch-vs-torch noise.
  """
  tol = TOLERANCES[tol] if isinstance(tol, str) else tol
  a = np.asarray(actual, np.float64)
  e = np.asarray(expected, np.float64)
  if a.shape != e.shape:
    raise ParityError(f"{name}: port shape {a.shape} != fixture shape {e.shape}")
  if e.size == 0:
    return 0.0
  if scale is None:
    scale = float(np.max(np.abs(e)))
  bound = tol.atol + tol.rtol * np.abs(e) + tol.scale_rtol * scale
  if tol.sum_ulps:
    if sumabs is None:
      raise ParityError(f"{name}: tolerance {tol.describe()} needs the sum of |terms|")
    bound = bound + tol.sum_ulps * F32_EPS * np.asarray(sumabs, np.float64)
  diff = np.abs(a - e)
  bad = ~(diff <= bound)  # NaN in either array is a failure
  worst = float(np.nanmax(diff)) if np.any(np.isfinite(diff)) else float("nan")
  if np.any(bad):
    where = np.unravel_index(int(np.argmax(np.where(bad, np.nan_to_num(diff, nan=np.inf), -1))), e.shape)
    raise ParityError(f"{name}: max |port - ref| {worst:.3g} exceeds {tol.describe()} "
                      f"({int(bad.sum())} of {e.size} elements; e.g. at {tuple(int(i) for i in where)}: "
                      f"port {a[where]:.7g}, ref {e[where]:.7g})")
  return worst


class Fixture(Mapping):
  """Read-only view of a fixture's arrays whose missing keys fail with a message, not a KeyError."""

  def __init__(self, arrays: Mapping[str, np.ndarray], name: str):
    self._arrays = dict(arrays)
    self.name = name

  def __getitem__(self, key: str) -> np.ndarray:
    try:
      return self._arrays[key]
    except KeyError:
      raise ParityError(f"{self.name}.npz lacks '{key}', which a stored output needs as input "
                        "(drop that output too, or store the input)") from None

  def __contains__(self, key: object) -> bool:
    return key in self._arrays

  def get(self, key: str, default: Any = None) -> Any:
    return self._arrays.get(key, default)

  def __iter__(self):
    return iter(self._arrays)

  def __len__(self) -> int:
    return len(self._arrays)


@dataclasses.dataclass(frozen=True)
class Rule:
  """How to compare the output keys matching ``pattern`` (``re.fullmatch``; first rule wins).

  ``port(match)`` returns the port's value for the key, in the fixture's layout; it may raise
  ``ParityError`` (e.g. for a key it recognises but cannot map, naming it). ``expect`` transforms
  the stored array before the comparison (e.g. a sum into a mean), ``scale(match)`` overrides the
  scale of a ``scale_rtol`` tolerance and ``sumabs(match)`` supplies Σ|terms| for ``sum_ulps``.
  """
  pattern: str
  tol: str
  port: Callable[[re.Match], Any]
  expect: Callable[[np.ndarray], Any] | None = None
  scale: Callable[[re.Match], float] | None = None
  sumabs: Callable[[re.Match], Any] | None = None


def classify(keys: Iterable[str], rules: Sequence[Rule], inputs: Sequence[str]
             ) -> tuple[list[tuple[str, Rule, re.Match]], list[str]]:
  """(output key, rule, match) for every key a rule claims, and the keys nobody claims."""
  plan, unclaimed = [], []
  for key in keys:
    if any(re.fullmatch(p, key) for p in inputs):
      continue
    for rule in rules:
      m = re.fullmatch(rule.pattern, key)
      if m:
        plan.append((key, rule, m))
        break
    else:
      unclaimed.append(key)
  return plan, unclaimed


def check_fixture(fixture: Mapping[str, np.ndarray], rules: Sequence[Rule], inputs: Sequence[str],
                  name: str, only: str | None = None) -> dict[str, float]:
  """Compares every output array of ``fixture``; returns {key: max |port - ref|}.

  Args:
    fixture: the fixture's arrays (e.g. ``conftest.load_fixture``), possibly a subset of a file.
    rules: how to compute and compare each output family.
    inputs: regexes of the keys that are inputs, recorded random draws or configuration scalars.
    name: the fixture's stem, for messages.
    only: optional regex restricting the comparison to some output keys (for tests of one path of
      the port); every key is still classified, so an unknown one fails all the same.

  Raises:
    ParityError: naming every unknown key, or every array that differs / cannot be computed.
  """
  plan, unclaimed = classify(fixture, rules, inputs)
  if unclaimed:
    raise ParityError(f"{name}.npz holds array(s) no rule compares: {unclaimed}. Teach the parity "
                      "test to compare them (a Rule), or list them as inputs if they are inputs.")
  if only is not None:
    plan = [p for p in plan if re.fullmatch(only, p[0])]
  if not plan:
    raise ParityError(f"{name}.npz holds no output array to compare" +
                      (f" matching {only!r}" if only else ""))
  errors, failures = {}, []
  for key, rule, m in plan:
    try:
      got = rule.port(m)
      expected = np.asarray(fixture[key])
      if rule.expect is not None:
        expected = rule.expect(expected)
      errors[key] = compare(got, expected, rule.tol, f"{name}:{key}",
                            scale=rule.scale(m) if rule.scale else None,
                            sumabs=rule.sumabs(m) if rule.sumabs else None)
      REPORT.append((name, key, rule.tol, errors[key], TOLERANCES[rule.tol]))
    except ParityError as err:
      failures.append(str(err))
  if failures:
    raise ParityError(f"{name}: {len(failures)} of {len(plan)} compared arrays fail:\n  " +
                      "\n  ".join(failures))
  return errors


def report_table(rows: Sequence[tuple[str, str, str, float, Tol]]) -> list[str]:
  """Max error per (fixture, tolerance family), with the tolerance and the README's noise."""
  worst: dict[tuple[str, str], tuple[float, str, int]] = {}
  for fixture, key, tol_name, err, _ in rows:
    prev = worst.get((fixture, tol_name), (-1.0, "", 0))
    n = prev[2] + 1
    worst[(fixture, tol_name)] = (err, key, n) if err > prev[0] else (prev[0], prev[1], n)
  lines = [f"{'fixture':<32} {'tolerance family':<24} {'n':>4} {'max err':>9}  {'worst key':<44} tolerance"]
  for (fixture, tol_name), (err, key, n) in sorted(worst.items()):
    lines.append(f"{fixture:<32} {tol_name:<24} {n:>4} {err:>9.3g}  {key:<44} "
                 f"{TOLERANCES[tol_name].describe()}")
  return lines
