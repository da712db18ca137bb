"""The numbers that judge generated images: Inception Score, FID and mask statistics.

Pure numpy (float64) on arrays the evaluation job collects, so each formula is tested on its own
against closed-form cases.

* Inception Score (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` per split, mean and
  (population) standard deviation over the splits. Splits are contiguous, ``[i*N//S, (i+1)*N//S)``
  as in the original TF code, so every image counts; sbarratt's torch port (which Re-CGN used)
  drops the last ``N % S`` images instead, identical when S divides N.
* FID (Heusel et al. 2017): ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. The trace
  of the matrix square root is computed as the sum of the square roots of the eigenvalues of the
  symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)``, which is similar to ``S1 S2`` and so has its
  eigenvalues. Two symmetric eigen-decompositions instead of ``scipy.linalg.sqrtm`` of the
  non-symmetric product (pytorch-fid): real by construction, no ``eps * I`` retry, and defined for
  rank-deficient covariances (fewer images than 2048 features); the two agree to 1e-9 relative on
  well-conditioned cases (tests/test_generation_metrics.py). With the generated features at hand
  and fewer images than features, :func:`frechet_distance_features` works on the N x N matrix
  instead, exactly; eigenvalues at rounding level count as 0 (their square roots would not).
* Masks: mean and standard deviation of the per-image mean mask (the paper's mu_mask, Re-CGN's
  ``mu_mask``: population std), and the fractions of masks whose mean lies below ``empty_below``
  / above ``full_above``. The defaults are the mask loss interval (0.1, 0.9) of the authors'
  shared/losses.py MaskLoss: the fractions are the masks that loss would still push.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from scipy import special

from cgn_jax.data.imagenet_cfs import atomic_write
from cgn_jax.errors import InputError

MASK_THRESHOLDS = (0.1, 0.9)  # shared/losses.py MaskLoss(interval=[0.1, 0.9])


def softmax(logits: np.ndarray) -> np.ndarray:
  """Row softmax in float64 (the probabilities the score is defined on)."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float, list[float]]:
  """``(mean, std, per-split scores)`` of class probabilities ``probs`` [N, K].

  Raises:
    InputError: fewer images than splits (a split without images has no score).
  """
  p = np.asarray(probs, np.float64)
  n = p.shape[0]
  if splits < 1 or n < splits:
    raise InputError(f"the Inception Score of {n} images cannot use {splits} splits; give at least "
                     f"as many images as splits (--config.num_images) or lower --config.splits")
  scores = []
  for i in range(splits):
    part = p[i * n // splits:(i + 1) * n // splits]
    kl = special.rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1)  # 0 log 0 = 0
    scores.append(float(np.exp(kl.mean())))
  return float(np.mean(scores)), float(np.std(scores)), scores


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(mu, sigma)`` of features [N, D] as pytorch-fid: float64 mean and ``np.cov`` (ddof 1)."""
  f = _two_or_more(features)
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _two_or_more(features: np.ndarray) -> np.ndarray:
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise InputError(f"FID statistics need at least 2 images, got {f.shape[0]}; evaluate more "
                     f"images (--config.num_images) or drop the FID (--config.fid_reference='')")
  return f


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
  """Eigenvalues of a PSD matrix with those at rounding level set to 0: a singular covariance (fewer
  images than features, or centring's null direction) has exact zeros that float64 returns as
  +-1e-16-ish, and their square roots (1e-8) would add up in the trace."""
  tol = max(float(w.max(initial=0.0)), 0.0) * w.size * np.finfo(np.float64).eps
  return np.where(w > tol, w, 0.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def _trace_sqrt(m: np.ndarray) -> float:
  """tr(m^(1/2)) of a symmetric PSD ``m``."""
  return float(np.sum(np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2)))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """The Fréchet distance of two Gaussians (FID on Inception pool3 statistics)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise InputError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{s1.shape} vs {s2.shape}; compute both with the same network")
  root1 = _sqrt_psd(s1)
  tr_covmean = _trace_sqrt(root1 @ s2 @ root1)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_features(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """:func:`frechet_distance` of ``statistics(features)`` and ``(mu2, sigma2)``, without forming
  the first covariance when there are fewer images N than features D.

  With ``A`` the centred features / sqrt(N - 1), ``S1 = A^T A``: ``S1 S2 = A^T (A S2)`` has the
  nonzero eigenvalues of the N x N PSD matrix ``A S2 A^T``, and ``tr(S1) = sum(A**2)``. Exact, and
  O(N D^2) instead of two D x D eigen-decompositions (Re-CGN's 2000 images against D = 2048).
  """
  f = _two_or_more(features)
  n, d = f.shape
  if n > d:
    return frechet_distance(*statistics(f), mu2, sigma2)
  mu1 = f.mean(axis=0)
  mu2, s2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
  if mu2.shape != (d,) or s2.shape != (d, d):
    raise InputError(f"FID statistics do not match: features have {d} dimensions, the reference "
                     f"mu {mu2.shape} and sigma {s2.shape}; compute both with the same network")
  a = (f - mu1) / np.sqrt(n - 1)
  tr_covmean = _trace_sqrt((a @ s2) @ a.T)
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(a * a) + np.trace(s2) - 2.0 * tr_covmean)


def mask_statistics(mask_means: np.ndarray, empty_below: float = MASK_THRESHOLDS[0],
                    full_above: float = MASK_THRESHOLDS[1]) -> dict[str, Any]:
  """Statistics of the per-image mean masks [N] (each the mean of one mask over its pixels)."""
  m = np.asarray(mask_means, np.float64).reshape(-1)
  if m.size == 0:
    raise InputError("no masks to summarise; the source gave images without masks")
  return {"mean": float(m.mean()), "std": float(m.std()),
          "frac_empty": float(np.mean(m < empty_below)),
          "frac_full": float(np.mean(m > full_above)),
          "empty_below": float(empty_below), "full_above": float(full_above),
          "num_images": int(m.size)}


# ---------------------------------------------------------------------------------------------
# Statistics files: ``mu`` [D], ``sigma`` [D, D], as pytorch-fid's/TTUR's .npz, plus what made them.

def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **meta: Any) -> str:
  """Writes ``mu``, ``sigma`` and ``meta`` (as a JSON string) to ``path`` atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic_write(path, lambda f: np.savez(f, mu=np.asarray(mu, np.float64),
                                        sigma=np.asarray(sigma, np.float64),
                                        meta=np.asarray(json.dumps(meta))))
  return path


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """``(mu, sigma, meta)`` of a statistics ``.npz``; ``meta`` is ``{}`` for files written elsewhere
  (pytorch-fid's ``--save-stats``, TTUR's ``fid_stats_*.npz``)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      if "mu" not in z.files or "sigma" not in z.files:
        raise InputError(f"{path} holds {', '.join(z.files) or 'no arrays'}, not FID statistics "
                         "(mu, sigma); give a folder of real images or a statistics .npz")
      meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
      return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64), meta
  except (OSError, ValueError) as e:
    raise InputError(f"{path} is not a readable .npz of FID statistics ({e}); give a folder of "
                     "real images or a statistics .npz with mu and sigma") from None
