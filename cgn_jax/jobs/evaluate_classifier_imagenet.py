"""The paper's classifier tables for one checkpoint: ImageNet val accuracy and cue-conflict shape
bias per head, IN-9 accuracies and the BG-gap (configs/imagenet_classifier_eval.py).

Any checkpoint serves: a training workdir of ``train_classifier_imagenet`` (its exported
``ensemble/``, or its newest checkpoint), a converted dir, the authors' ensemble ``.pth``, or a
torchvision ResNet (one head: the paper's ImageNet-only ResNet-50 row). The evaluation itself is
``cgn_jax.evaluation.classifier_eval``, the same code the training job runs after every epoch.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from cgn_jax import parallel
from cgn_jax.data import synthetic_imagenet
from cgn_jax.data.imagenet_cfs import atomic_write
from cgn_jax.data.storage import DataError
from cgn_jax.errors import check_choice
from cgn_jax.evaluation import classifier_eval
from cgn_jax.models import resnet
from cgn_jax.models.resnet import load_model


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """The config's named choices, checked before anything is built or written."""
  check_choice(config, "model.dtype", ("float32", "bfloat16"))
  check_choice(config, "eval.in9_normalization", ("in9", "imagenet"))
  check_choice(config, "family", ("", *resnet.MODULES))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates ``config.checkpoint`` on ``config.sets``; writes results.json and tables.md."""
  check_inputs(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.create_mesh(config.num_devices)
  parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  data = synthetic_imagenet.resolve(config.data, workdir, config.seed)
  field = {"imagenet": "imagenet_dir", "shape_bias": "cue_conflict_dir", "backgrounds": "in9_dir",
           "imagenet_a": "imagenet_a_dir", "sketch": "sketch_dir"}
  missing = [s for s in config.sets if not data[field[s]]]
  if missing:
    raise DataError("no data for " + ", ".join(missing) + "; pass " +
                     " ".join(f"--config.data.{field[s]}=DIR" for s in missing))
  model, variables, what = load_model(config, workdir)
  variables = parallel.replicate(variables, mesh)
  forward = classifier_eval.make_forward(classifier_eval.model_logits(model), mesh)
  results = classifier_eval.evaluate(forward, variables, data, config.eval, sets=config.sets)
  text = classifier_eval.tables(results, config.eval.model_name)
  if jax.process_index() == 0:
    out = {"checkpoint": what, "sets": list(config.sets), **results}
    atomic_write(os.path.join(workdir, "results.json"),
                 lambda f: f.write(json.dumps(out, indent=1).encode()))
    atomic_write(os.path.join(workdir, "tables.md"), lambda f: f.write(text.encode()))
    print(f"{what}\n\n{text}", flush=True)
  return results
