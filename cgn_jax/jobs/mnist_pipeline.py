"""The MNIST quickstart: every stage of CGN on one variant, end to end, in one command.

1. a sample sheet of the authors' pretrained CGN (converted from their .pth on first use);
2. the dataset variant, built from raw MNIST;
3. a short CGN training run (checkpoints, metrics, sample sheets);
4. counterfactuals from that CGN;
5. the CNN classifier trained on real and on counterfactual data, test accuracies printed.

Each stage runs its own job function in a sub-directory of the workdir, so any stage can be re-run
alone with its own config; finished stages are reused.
"""

from __future__ import annotations

import json
import os

import ml_collections

from cgn_jax.jobs import run_job


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  results: dict = {}
  if config.authors_checkpoint:
    if os.path.isfile(config.authors_checkpoint) or os.path.isdir(config.authors_checkpoint):
      sheet_cfg = ml_collections.ConfigDict({"job": "sample_mnist", "seed": 0, "model": None,
                                             "checkpoint": config.authors_checkpoint,
                                             "n_per_class": 2, "sheet_name": "authors_cgn_sheet.png"})
      results["authors_sheet"] = run_job(sheet_cfg, workdir)
    else:
      print(f"skipping the authors' sample sheet: {config.authors_checkpoint} not found")

  cgn_dir = os.path.join(workdir, "cgn")
  run_job(config.cgn, cgn_dir)
  results["cgn_samples"] = os.path.join(cgn_dir, "samples")

  gen = config.generate.copy_and_resolve_references()
  with gen.unlocked():
    gen.checkpoint = os.path.join(cgn_dir, "generator")
  cf_dir = run_job(gen, os.path.join(workdir, "generate"))

  accs = {}
  for train_on in ("real", "counterfactual"):
    clf = config.classifier.copy_and_resolve_references()
    with clf.unlocked():
      clf.train_on = train_on
      clf.cf_dataset_dir = cf_dir
      clf.real_dataset_dir = config.cgn.dataset_dir or os.path.join(cgn_dir, "data", config.cgn.dataset)
    res = run_job(clf, os.path.join(workdir, f"classifier_{train_on}"))
    accs[train_on] = res["final_test_acc"]
  results["test_accuracy"] = accs
  print(f"\n{config.cgn.dataset}: classifier test accuracy trained on real data "
        f"{accs['real']:.2f}%, on counterfactuals {accs['counterfactual']:.2f}%")
  with open(os.path.join(workdir, "pipeline_results.json"), "w") as f:
    json.dump(results, f, indent=1)
  return results
