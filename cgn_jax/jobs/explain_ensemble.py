"""Evidence heatmaps of the ImageNet invariant ensemble: occlusion, integrated gradients, per head.

For the first ``config.num_images`` images under ``config.images`` (recursively, sorted), cropped
and normalised as the classifier evaluation does (``imagenet.EvalTransform``: Resize(256) +
CenterCrop(224) + ImageNet mean/std), it computes occlusion sensitivity and integrated gradients
(``cgn_jax.evaluation.heatmaps``, jitted, every head from one backbone pass) for each head in
``config.heads`` and writes ``heatmaps.png`` (rows: images; columns: the image, then per head the
occlusion and the integrated-gradients overlay; the names in results.json ``sheet.columns``),
``heatmaps.npz`` (``<head>/<method>`` (N, H, W), ``<head>/target``, ``<head>/predicted`` and the
model's ``images``), ``results.json`` (per image: path, per head target, score, prediction) and
prints a table. Each file is written under a temporary name and renamed; results.json comes last.

The class explained (``target="folder"``) is the image's class folder where its name is one (an
integer, or an ImageNet WNID of ``imagenet_class_index.json``), else each head's own top-1; with
``target="predicted"`` always the head's top-1. results.json says which for every image and head.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from cgn_jax.data import imagenet
from cgn_jax.data.storage import DataError
from cgn_jax.errors import ConfigError, check_choice, closest
from cgn_jax.evaluation import classifier_eval, heatmaps
from cgn_jax.models import resnet

RESULTS, SHEET, ARRAYS = heatmaps.RESULTS, heatmaps.SHEET, heatmaps.ARRAYS
METHODS = ("occlusion", "integrated_gradients")
TARGETS = ("folder", "predicted")
BASELINES = ("mean", "black")
# The ensemble's outputs, and a plain torchvision ResNet's one (classifier_eval.model_logits).
HEAD_CHOICES = (*resnet.OUTPUT_KEYS, "logits")
_WNID = re.compile(r"^n\d{8}$")


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """The config's choices and sizes, checked before anything is read, loaded or written."""
  for field, choices in (("target", TARGETS), ("score", heatmaps.SCORES), ("baseline", BASELINES),
                         ("ig.rule", heatmaps.RULES), ("model.dtype", ("float32", "bfloat16")),
                         ("family", ("", *resnet.MODULES))):
    check_choice(config, field, choices)
  heads = tuple(config.heads)
  for h in heads:
    if h not in HEAD_CHOICES:
      best = closest(h, HEAD_CHOICES)
      hint = f"; did you mean {best}?" if best else ""
      raise ConfigError(f"--config.heads names {h!r}, which is not one of "
                        f"{', '.join(HEAD_CHOICES)}{hint}")
  if not heads or len(set(heads)) != len(heads):
    raise ConfigError(f"--config.heads={heads} must name each head once, at least one; e.g. "
                      f"--config.heads=\"('shape_preds', 'avg_preds')\"")
  if config.family:  # a .pth's family is known before it is converted
    check_heads(heads, ("logits",) if config.family == "resnet50" else resnet.OUTPUT_KEYS,
                f"--config.family={config.family}")
  if config.num_images < 1 or config.batch_size < 1:
    raise ConfigError(f"--config.num_images={config.num_images} and --config.batch_size="
                      f"{config.batch_size} must both be >= 1")
  size, occ = config.data.image_size, config.occlusion
  if not 0 < occ.patch <= size or occ.stride < 1:
    raise ConfigError(f"--config.occlusion.patch={occ.patch} / .stride={occ.stride} do not fit "
                      f"the {size}-px crop; need 0 < patch <= {size} and stride >= 1")
  if config.ig.steps < 1:
    raise ConfigError(f"--config.ig.steps={config.ig.steps} must be >= 1")


def check_heads(heads: tuple[str, ...], outputs: tuple[str, ...], what: str) -> None:
  """Raises ConfigError unless the model (``what``) outputs every head in ``heads``."""
  missing = [h for h in heads if h not in outputs]
  if missing:
    raise ConfigError(f"--config.heads names {', '.join(missing)}, which {what} does not output; "
                      f"choose from {', '.join(outputs)}")


def _class_of(folder: str, num_classes: int, index: dict[str, int] | None) -> int | None:
  """The class a folder's name gives: an integer below ``num_classes``, or a WNID of ``index``."""
  if folder.isdigit() and int(folder) < num_classes:
    return int(folder)
  if index is not None and folder in index and index[folder] < num_classes:
    return index[folder]
  return None


def list_images(config: ml_collections.ConfigDict) -> tuple[list[str], list[int | None]]:
  """(paths, folder classes or None): the first ``num_images`` images under ``config.images``."""
  root = config.images
  if not root:
    raise ConfigError("--config.images is empty; pass --config.images=DIR, a folder of .png/.jpg "
                      "images (class sub-folders named by WNID or index give the target)")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--config.images={root} does not exist or is not a folder; pass a "
                            "folder of .png/.jpg images")
  paths = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    paths += sorted(os.path.join(folder, n) for n in names if not n.startswith(".")
                    and n.lower().endswith(imagenet.IMAGE_EXTENSIONS))
  if not paths:
    raise DataError(f"--config.images={root} holds no {'/'.join(imagenet.IMAGE_EXTENSIONS)} "
                    "images (searched recursively); point it at a folder of images")
  paths = sorted(paths)[:config.num_images]
  folders = [os.path.basename(os.path.dirname(os.path.relpath(p, root))) for p in paths]
  index = None
  if any(_WNID.match(f) for f in folders):
    index_file = os.path.join(config.data.eval_dir, "imagenet_class_index.json")
    if not os.path.isfile(index_file):
      raise DataError(f"the images sit in WNID folders but {index_file} is missing; pass "
                      "--config.data.eval_dir=<shared/data>/eval, or --config.target=predicted")
    index = {wnid: int(i) for i, (wnid, _) in _read_json(index_file).items()}
  return paths, [_class_of(f, config.model.num_classes, index) if f else None for f in folders]


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def class_names(config: ml_collections.ConfigDict, num_classes: int) -> list[str] | None:
  """The 1000 ImageNet class names (for the table and results.json), None for other models."""
  path = os.path.join(config.data.eval_dir, "imagenet_class_index.json")
  if num_classes != 1000 or not os.path.isfile(path):
    return None
  return [name for _, (_, name) in sorted(_read_json(path).items(), key=lambda kv: int(kv[0]))]


def heads_apply_fn(model, heads: tuple[str, ...]) -> heatmaps.ApplyFn:
  """``apply(variables, images) -> {head: logits}`` of the chosen heads, one backbone pass."""
  logits = classifier_eval.model_logits(model)

  def apply(variables, images):
    out = logits(variables, images)
    return {h: out[h] for h in heads}
  return apply


def baseline_value(name: str) -> np.ndarray:
  """The baseline in the model's (normalised) input space, per channel: ``mean`` is the ImageNet
  mean colour (all zeros after Normalize), ``black`` the black image ((0 - mean) / std)."""
  if name == "mean":
    return np.zeros(3, np.float32)
  return (-np.asarray(imagenet.IMAGENET_MEAN) / np.asarray(imagenet.IMAGENET_STD)).astype(
      np.float32)


def target_scores(logits: np.ndarray, targets: np.ndarray, score: str) -> np.ndarray:
  """(N,) float64 score of ``targets``: log-probability, probability or logit."""
  z = np.asarray(logits, np.float64)
  picked = z[np.arange(len(z)), targets]
  if score == "logit":
    return picked
  top = z.max(-1)
  log_p = picked - top - np.log(np.exp(z - top[:, None]).sum(-1))
  return np.exp(log_p) if score == "prob" else log_p


def explain(fns: dict[str, Any], variables, images: np.ndarray, folder_classes: list[int | None],
            config: ml_collections.ConfigDict) -> dict[str, dict[str, np.ndarray]]:
  """{head: {occlusion, integrated_gradients (N, H, W), target, from_folder, predicted, logits,
  ig_sum, ig_gap}} over fixed-size batches (the last one padded: one compiled program)."""
  heads, b = tuple(config.heads), config.batch_size
  base = baseline_value(config.baseline)
  known = np.array([c is not None and config.target == "folder" for c in folder_classes])
  labels = np.array([c or 0 for c in folder_classes], np.int32)
  parts: dict[str, dict[str, list]] = {h: {} for h in heads}
  for s in range(0, len(images), b):
    x, n = images[s:s + b], len(images[s:s + b])
    if n < b:
      x = np.concatenate([x, np.zeros((b - n,) + x.shape[1:], x.dtype)])
    logits = {h: np.asarray(v) for h, v in fns["logits"](variables, x).items()}
    pred = {h: v.argmax(-1).astype(np.int32) for h, v in logits.items()}
    kb = np.pad(known[s:s + b], (0, b - n))
    lb = np.pad(labels[s:s + b], (0, b - n))
    targets = {h: np.where(kb, lb, pred[h]).astype(np.int32) for h in heads}
    occ = fns["occlusion"](variables, x, targets)
    attr, gap = fns["integrated_gradients"](variables, x, base, targets)
    for h in heads:
      a = np.asarray(attr[h])
      got = {"occlusion": np.asarray(occ[h]),
             # summed over channels: the per-pixel attribution, whose total is still the gap
             "integrated_gradients": a.sum(-1), "ig_sum": a.sum((1, 2, 3)),
             "ig_gap": np.asarray(gap[h]), "target": targets[h], "from_folder": kb,
             "predicted": pred[h], "logits": logits[h]}
      for k, v in got.items():
        parts[h].setdefault(k, []).append(v[:n])
  return {h: {k: np.concatenate(v) for k, v in p.items()} for h, p in parts.items()}


def display_images(images: np.ndarray) -> np.ndarray:
  """Normalised model inputs back to [-1, 1] RGB for the sheet."""
  x = images * np.asarray(imagenet.IMAGENET_STD, np.float32) + np.asarray(imagenet.IMAGENET_MEAN,
                                                                          np.float32)
  return np.clip(x, 0, 1) * 2 - 1


def _name(names: list[str] | None, k: int) -> str | None:
  return names[k] if names else None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Explains every head on the images; returns what results.json holds."""
  check_inputs(config)
  t0 = time.time()
  heads = tuple(config.heads)
  paths, folder_classes = list_images(config)
  transform = imagenet.EvalTransform(config.data.image_size, config.data.resize)
  images = np.stack([transform(imagenet.load_image(p)) for p in paths])
  os.makedirs(workdir, exist_ok=True)
  model, variables, what = resnet.load_model(config, workdir)
  check_heads(heads, resnet.OUTPUT_KEYS if isinstance(model, resnet.InvariantEnsemble)
              else ("logits",), f"{what} (a {type(model).__name__})")

  apply_fn = heads_apply_fn(model, heads)
  occ, ig = config.occlusion, config.ig
  base = baseline_value(config.baseline)
  fns = {"logits": jax.jit(apply_fn),
         "occlusion": heatmaps.occlusion_fn(apply_fn, patch=occ.patch, stride=occ.stride,
                                            baseline=base, score=config.score, chunk=occ.chunk),
         "integrated_gradients": heatmaps.integrated_gradients_fn(
             apply_fn, steps=ig.steps, rule=ig.rule, score=config.score, chunk=ig.chunk)}
  t1 = time.time()
  out = explain(fns, variables, images, folder_classes, config)
  seconds = time.time() - t1
  names = class_names(config, model.num_classes)

  per_image = []
  for i, p in enumerate(paths):
    row = {"path": os.path.abspath(p), "folder_class": folder_classes[i], "heads": {}}
    for h in heads:
      o = out[h]
      t, k = int(o["target"][i]), int(o["predicted"][i])
      row["heads"][h] = {
          "target": t, "target_name": _name(names, t),
          "target_from": "folder" if o["from_folder"][i] else "predicted",
          "score": float(target_scores(o["logits"][i:i + 1], o["target"][i:i + 1],
                                       config.score)[0]),
          "predicted": k, "predicted_name": _name(names, k),
          "ig_sum": float(o["ig_sum"][i]), "ig_gap": float(o["ig_gap"][i])}
    per_image.append(row)
  k = min(config.sheet.num_images, len(paths))
  columns = {f"{h} {m}": out[h][m][:k] for h in heads for m in METHODS}
  cells, col_names = heatmaps.sheet_rows(display_images(images[:k]), columns)
  results: dict = {
      "checkpoint": what, "images_dir": os.path.abspath(config.images), "num_images": len(paths),
      "heads": list(heads), "score": config.score,
      "target": ("the class folder's class where the folder names one, else each head's top-1"
                 if config.target == "folder" else "each head's top-1 prediction"),
      "baseline": {"mean": "the ImageNet mean colour (zeros after Normalize)",
                   "black": "the black image ((0 - mean) / std after Normalize)"}[config.baseline],
      "transform": f"Resize({config.data.resize}) + CenterCrop({config.data.image_size}) + "
                   "ImageNet mean/std (the classifier evaluation's)",
      "occlusion": occ.to_dict(), "integrated_gradients": ig.to_dict(),
      # The quadrature error of completeness relative to the mean |gap|: raise ig.steps if large.
      "ig_completeness_error": {
          h: float(np.mean(np.abs(out[h]["ig_sum"] - out[h]["ig_gap"]))
                   / max(float(np.mean(np.abs(out[h]["ig_gap"]))), 1e-12)) for h in heads},
      "images": per_image, "seconds": seconds,
      "sheet": {"path": os.path.join(workdir, SHEET), "columns": col_names}}
  arrays = {"images": images}
  for h in heads:
    for key in (*METHODS, "target", "predicted"):
      arrays[f"{h}/{key}"] = out[h][key].astype(np.float32 if key in METHODS else np.int32)
  results["wall_s"] = time.time() - t0
  if jax.process_index() == 0:
    heatmaps.write_outputs(workdir, cells, config.sheet.scale, arrays, results)
    print(table(results), flush=True)
  return results


def table(results: dict) -> str:
  """The printed summary: per image and head the explained class, its score and the top-1."""
  lines = [f"{results['num_images']} images from {results['images_dir']}, {results['checkpoint']}; "
           f"heatmaps of the target's {results['score']} (baseline: {results['baseline']})",
           f"  {'image':<28}{'head':<21}{'target':<30}{results['score']:>9}  {'top-1':<26}"
           f"{'IG sum / gap':>17}"]
  for row in results["images"]:
    name = os.path.relpath(row["path"], results["images_dir"])
    for h, r in row["heads"].items():
      source = "folder" if r["target_from"] == "folder" else "top-1"
      tgt = f"{r['target']} {r['target_name'] or ''}".strip()[:20] + f" ({source})"
      top = f"{r['predicted']} {r['predicted_name'] or ''}".strip()[:25]
      lines.append(f"  {name[-27:]:<28}{h:<21}{tgt:<30}{r['score']:>9.3f}  {top:<26}"
                   f"{r['ig_sum']:>8.3f} / {r['ig_gap']:.3f}")
      name = ""
  err = ", ".join(f"{h} {e:.1%}" for h, e in results["ig_completeness_error"].items())
  lines.append(f"  IG completeness error (|sum - gap| / mean |gap|): {err}")
  lines.append(f"  sheet {results['sheet']['path']} (columns: "
               f"{', '.join(results['sheet']['columns'])})")
  return "\n".join(lines)
