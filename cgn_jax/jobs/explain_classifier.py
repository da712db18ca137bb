"""Evidence heatmaps of MNIST classifiers, and Re-CGN's check that they look at the digit.

For each classifier in ``config.classifiers`` (a ``train_classifier`` workdir, a converted dir, or
the authors' ``.pth``) and the first ``config.num_images`` images of a split of the MNIST variant,
it computes occlusion sensitivity and integrated gradients (``cgn_jax.evaluation.heatmaps``), and
the IoU of each heatmap's top pixels with the digit's foreground mask; it writes
``heatmaps.png`` (rows: images; columns: image, mask, then per classifier the occlusion and the
integrated-gradients overlay), ``results.json`` (temp name, then renamed), every heatmap in
``heatmaps.npz`` (``<classifier>/<method>`` (N, 32, 32), ``masks``, ``labels``) and prints a table.

The mask is the MNIST digit behind each image, thresholded at ``foreground_threshold`` (pixel >
128 by default, Re-CGN's ``> 0.5`` on [0, 1] but for the grey level 128 itself) and resized to
32 x 32 with the variant's own index map, so it lies exactly on the image's digit. Double-colored
and Wildlife MNIST colour every pixel > 25 as the digit: the > 128 mask is the stroke's core.
The heatmap's top pixels are as many as the mask has (``heatmaps.heat_iou``), so no threshold
on the heat's scale is needed, and the IoU a random heatmap would get is printed beside.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from cgn_jax import checkpoints
from cgn_jax.data import batches, mnist_idx, storage
from cgn_jax.data import mnist_variants as mv
from cgn_jax.errors import ConfigError, check_choice
from cgn_jax.evaluation import heatmaps
from cgn_jax.models import classifiers

RESULTS, SHEET, ARRAYS = heatmaps.RESULTS, heatmaps.SHEET, heatmaps.ARRAYS
METHODS = ("occlusion", "integrated_gradients")


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """The config's named choices, checked before anything is loaded or written."""
  check_choice(config, "dataset", mv.VARIANTS)
  check_choice(config, "split", ("train", "test"))
  check_choice(config, "target", ("predicted", "label"))
  check_choice(config, "score", heatmaps.SCORES)
  check_choice(config, "ig.rule", heatmaps.RULES)
  if config.num_images < 1 or config.batch_size < 1:
    raise ConfigError(f"--config.num_images={config.num_images} and --config.batch_size="
                      f"{config.batch_size} must both be >= 1")


def classifier_paths(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{name: checkpoint} of the classifiers to explain; ``pipeline_dir`` fills the empty ones with
  the quickstart's ``classifier_<name>`` workdirs."""
  paths = {}
  for name, path in config.classifiers.items():
    if not path and config.pipeline_dir:
      path = os.path.join(config.pipeline_dir, f"classifier_{name}")
    if path:
      if not os.path.exists(path):
        raise FileNotFoundError(f"--config.classifiers.{name}={path} does not exist; pass a "
                                "train_classifier workdir, a converted dir or the authors' .pth")
      paths[name] = path
  if not paths:
    raise ConfigError("no classifier to explain; pass --config.classifiers.real=DIR (and/or "
                      ".counterfactual=DIR: train_classifier workdirs) or --config.pipeline_dir="
                      "the quickstart's workdir")
  return paths


def load_classifier(path: str, cache_dir: str) -> tuple[classifiers.MnistCNN, Any, str]:
  """``(module, variables, description)``: the newest checkpoint of a ``train_classifier``
  workdir, else a converted dir or the authors' ``.pth`` (``classifiers.load``)."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    tree, record = checkpoints.read_train_checkpoint(path)
    state = tree["state"]
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return classifiers.MnistCNN(), variables, f"{path} (training checkpoint, step {record['step']})"
  model, variables = classifiers.load(path, cache_dir)
  return model, variables, path


def dataset_dir(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, str]:
  """(the built variant, the raw MNIST folder it was built from): ``config.dataset_dir``, else
  the quickstart's (``pipeline_dir``), else one built into ``<workdir>/data/<dataset>``."""
  path = config.dataset_dir or (os.path.join(config.pipeline_dir, "cgn", "data", config.dataset)
                                if config.pipeline_dir else "")
  if not path:
    path = batches.variant_dir(config, workdir)
  manifest = storage.read_manifest(path)
  if manifest.get("name") != config.dataset:
    raise ConfigError(f"{path} holds {manifest.get('name')}, not --config.dataset="
                      f"{config.dataset}; pass the matching --config.dataset or "
                      "--config.dataset_dir")
  # The masks come from the very digits the images were made of.
  source = manifest.get("source", "")
  return path, source if source and os.path.isdir(source) else config.data_dir


def digit_masks(name: str, data_dir: str, split: str, n: int, threshold: int) -> np.ndarray:
  """(n, 32, 32) bool: the first ``n`` MNIST digits of the variant's ``split``, pixel >
  ``threshold``, resized as the variant resizes them."""
  train = mnist_idx.load_mnist(data_dir, "train")
  test = mnist_idx.load_mnist(data_dir, "test") if name == "colored_MNIST" else None
  digits = mv.variant_splits(name, train, test)[split][0][:n]
  index = (mv.pil_nearest_index if name == "colored_MNIST" else mv.torch_nearest_index)(
      28, mv.IMAGE_SIZE)
  return mv.resize_mask(digits > threshold, index, channels=1).reshape(len(digits), mv.IMAGE_SIZE,
                                                                        mv.IMAGE_SIZE)


def explain(fns: dict[str, Any], variables, images: np.ndarray, labels: np.ndarray,
            config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Every method's (N, H, W) heat, the IG gap and the predictions, over fixed-size batches (the
  last one padded: one compiled program)."""
  out: dict[str, list] = {k: [] for k in (*METHODS, "ig_sum", "ig_gap", "pred")}
  b = config.batch_size
  for s in range(0, len(images), b):
    x, y = images[s:s + b], labels[s:s + b]
    n = len(x)
    if n < b:
      x = np.concatenate([x, np.zeros((b - n,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(b - n, y.dtype)])
    pred = np.asarray(fns["predict"](variables, x))
    target = y if config.target == "label" else pred
    occ = fns["occlusion"](variables, x, target)
    attr, gap = fns["integrated_gradients"](variables, x, config.ig.baseline, target)
    attr = np.asarray(attr)
    out["occlusion"].append(np.asarray(occ)[:n])
    # Summed over channels: the per-pixel attribution, whose total is still the gap.
    out["integrated_gradients"].append(attr.sum(-1)[:n])
    out["ig_sum"].append(attr.sum((1, 2, 3))[:n])
    out["ig_gap"].append(np.asarray(gap)[:n])
    out["pred"].append(pred[:n])
  return {k: np.concatenate(v) for k, v in out.items()}


def _stats(values: np.ndarray) -> dict[str, float]:
  return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Explains every classifier on the split; returns what results.json holds."""
  check_inputs(config)
  t0 = time.time()
  paths = classifier_paths(config)
  os.makedirs(workdir, exist_ok=True)
  data, raw = dataset_dir(config, workdir)
  stored, labels, encoding = batches.load_split(data, config.split)
  n = min(config.num_images, len(labels))
  images = storage.decode_images(stored[:n], encoding)
  labels = labels[:n]
  masks = digit_masks(config.dataset, raw, config.split, n,
                      config.foreground_threshold)

  model = classifiers.MnistCNN()  # one architecture: the compiled functions serve every classifier
  apply_fn = heatmaps.mnist_apply_fn(model)
  occ, ig = config.occlusion, config.ig
  fns = {"predict": jax.jit(lambda v, x: apply_fn(v, x).argmax(-1)),
         "occlusion": heatmaps.occlusion_fn(apply_fn, patch=occ.patch, stride=occ.stride,
                                            baseline=occ.baseline, score=config.score,
                                            chunk=occ.chunk),
         "integrated_gradients": heatmaps.integrated_gradients_fn(
             apply_fn, steps=ig.steps, rule=ig.rule, score=config.score, chunk=ig.chunk)}
  chance = heatmaps.chance_iou(masks, config.iou_fraction)
  results: dict = {
      "dataset": config.dataset, "split": config.split, "dataset_dir": os.path.abspath(data),
      "num_images": int(n), "target": config.target, "score": config.score,
      "mask": f"MNIST pixel > {config.foreground_threshold}",
      "iou_top_pixels": (f"top {config.iou_fraction:.0%} of the pixels" if config.iou_fraction > 0
                         else "top |mask| pixels (as many as the mask has)"),
      "mask_area": _stats(masks.reshape(n, -1).mean(1)), "chance_iou": _stats(chance),
      "occlusion": occ.to_dict(), "integrated_gradients": ig.to_dict(), "classifiers": {}}
  columns: dict[str, np.ndarray] = {}
  arrays = {"masks": masks, "labels": labels}
  k = min(config.sheet.num_images, n)
  for name, path in paths.items():
    _, variables, what = load_classifier(path, os.path.join(workdir, "converted"))
    t1 = time.time()
    out = explain(fns, variables, images, labels, config)
    gap = out["ig_gap"]
    res = {"checkpoint": what, "accuracy": float(100 * np.mean(out["pred"] == labels)),
           # The quadrature error of completeness, relative to the mean |gap|: raise ig.steps if
           # it is not small.
           "ig_completeness_error": float(np.mean(np.abs(out["ig_sum"] - gap))
                                          / max(np.mean(np.abs(gap)), 1e-12)),
           "seconds": time.time() - t1}
    for method in METHODS:
      res[method] = {sign: _stats(heatmaps.heat_iou(out[method], masks, config.iou_fraction, sign))
                     for sign in heatmaps.SIGNS}
      columns[f"{name} {method}"] = out[method][:k]
      arrays[f"{name}/{method}"] = out[method].astype(np.float32)
    arrays[f"{name}/predicted"] = out["pred"]
    results["classifiers"][name] = res

  cells, names = heatmaps.sheet_rows(images[:k], columns, masks[:k])
  results["sheet"] = {"path": os.path.join(workdir, SHEET), "columns": names}
  results["wall_s"] = time.time() - t0
  if jax.process_index() == 0:
    heatmaps.write_outputs(workdir, cells, config.sheet.scale, arrays, results)
    print(table(results), flush=True)
  return results


def table(results: dict) -> str:
  """The printed summary: IoU with the digit mask per classifier, method and ranking."""
  ch = results["chance_iou"]
  lines = [f"{results['dataset']} {results['split']}[:{results['num_images']}]: IoU of the "
           f"heatmap's {results['iou_top_pixels']} with the digit mask ({results['mask']}), mean "
           f"± std over images; pixels ranked by |heat| or by heat (h > 0: evidence for the "
           f"class); chance {ch['mean']:.3f}",
           f"  {'classifier':<16}{'accuracy':>9}   {'occlusion |h|':>14}{'occlusion h':>14}"
           f"{'int. grad. |h|':>15}{'int. grad. h':>14}{'IG compl. err':>15}"]
  for name, r in results["classifiers"].items():
    cells = "".join(f"{r[m][s]['mean']:>7.3f} ± {r[m][s]['std']:.2f}" for m in METHODS
                    for s in heatmaps.SIGNS)
    lines.append(f"  {name:<16}{r['accuracy']:>8.1f}%   {cells}{r['ig_completeness_error']:>14.1%}")
  lines.append(f"  heatmaps of the {results['target']} class's {results['score']}; sheet "
               f"{results['sheet']['path']} (columns: {', '.join(results['sheet']['columns'])})")
  return "\n".join(lines)
