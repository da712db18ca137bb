"""The MNIST quickstart: every stage of CGN on one variant, end to end, in one command.

1. a sample sheet of the counterfactuals' generator (the authors' pretrained CGN, converted from
   their .pth on first use);
2. the dataset variant, built from raw MNIST;
3. a short CGN training run (checkpoints, metrics, sample sheets): the training plumbing; minutes
   of CPU cannot train a CGN, so its generator makes the counterfactuals only when
   ``generate.checkpoint`` is empty (``:tiny``);
4. counterfactuals from ``generate.checkpoint``;
5. the CNN classifier trained on real and on counterfactual data, test accuracies printed beside
   the paper's.

Each stage runs its own job function in a sub-directory of the workdir, so any stage can be re-run
alone with its own config; finished stages are reused.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from cgn_jax.jobs import run_job

# The paper's Table 2, CGN row (test accuracy %, trained on counterfactuals only); the same values
# as scripts/reproduce_mnist_table.py.
PAPER_CGN = {"colored_MNIST": 95.1, "double_colored_MNIST": 89.0, "wildlife_MNIST": 85.7}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the five stages in ``workdir``; returns the paths and both test accuracies."""
  cf_checkpoint = config.generate.checkpoint
  if cf_checkpoint and not os.path.exists(cf_checkpoint):  # fail before minutes of training
    raise FileNotFoundError(
        f"{cf_checkpoint} not found: the counterfactuals come from the authors' pretrained CGN; "
        "set $CGN_DATA to the folder holding pretrained/mnist_cgn/, or pass "
        "--config.generate.checkpoint='' to use the briefly trained CGN (near-chance accuracy)")
  results: dict = {}
  if cf_checkpoint:
    sheet_cfg = ml_collections.ConfigDict({"job": "sample_mnist", "seed": 0, "model": None,
                                           "checkpoint": cf_checkpoint, "n_per_class": 2,
                                           "sheet_name": "authors_cgn_sheet.png"})
    results["authors_sheet"] = run_job(sheet_cfg, workdir)

  cgn_dir = os.path.join(workdir, "cgn")
  _stage("cgn", config.cgn, cgn_dir)
  results["cgn_samples"] = os.path.join(cgn_dir, "samples")

  gen = config.generate.copy_and_resolve_references()
  with gen.unlocked():
    gen.checkpoint = cf_checkpoint or os.path.join(cgn_dir, "generator")
  cf_dir = _stage("generate", gen, os.path.join(workdir, "generate"))
  results["counterfactuals"] = {"dir": cf_dir, "generator": gen.checkpoint}

  runs = {}
  for train_on in ("real", "counterfactual"):
    clf = config.classifier.copy_and_resolve_references()
    clf.train_on = train_on
    clf.cf_dataset_dir = cf_dir
    clf.real_dataset_dir = (config.cgn.dataset_dir
                            or os.path.join(cgn_dir, "data", config.cgn.dataset))
    for field, value in config.classifier_per_source[train_on].items():
      clf[field] = value  # the copy stays locked: a mistyped field is an error
    res = _stage("classifier", clf, os.path.join(workdir, f"classifier_{train_on}"))
    runs[train_on] = {"train_acc": res["final_train_acc"], "test_acc": res["final_test_acc"],
                      "n_train": res.get("n_train", 0), "epochs": clf.epochs}
  results["classifiers"] = runs
  results["test_accuracy"] = {k: r["test_acc"] for k, r in runs.items()}
  if jax.process_index() == 0:  # one summary and one file, however many processes ran it
    print(_summary(config, gen.checkpoint, cgn_dir, runs))
    with open(os.path.join(workdir, "pipeline_results.json"), "w") as f:
      json.dump(results, f, indent=1)
  return results


def _stage(name: str, config: ml_collections.ConfigDict, workdir: str):
  """``run_job`` of the stage ``config.<name>``: an input error names the pipeline's own field
  (``--config.cgn.data_dir``, not the stage job's ``--config.data_dir``)."""
  try:
    return run_job(config, workdir)
  except Exception as e:  # pylint: disable=broad-except  # re-raised, reworded or as it was
    text = str(e)
    if "--config." not in text or len(e.args) != 1:
      raise
    try:
      reworded = type(e)(text.replace("--config.", f"--config.{name}."))
    except Exception:  # pylint: disable=broad-except  # an exception type that takes other args
      raise e from None
    raise reworded from e


def _summary(config: ml_collections.ConfigDict, generator: str, cgn_dir: str,
             runs: dict[str, dict]) -> str:
  """The closing table: both classifiers beside the paper; which CGN made the counterfactuals."""
  ds, gen = config.cgn.dataset, config.generate
  paper = PAPER_CGN.get(ds)
  row = lambda name, r, ref: (f"  {name:<21}{r['n_train']:>8,}{r['epochs']:>8}"
                              f"{r['train_acc']:>9.2f}%{r['test_acc']:>9.2f}%   {ref}")
  lines = [
      f"\n{ds}, the CNN tested on the real test split (colours shuffled): real data teach it "
      "colour, counterfactuals shape",
      f"  {'trained on':<21}{'images':>8}{'epochs':>8}{'train*':>10}{'test':>10}"
      "   paper, Table 2 (test)",
      row("real data", runs["real"], "low (the 'original' row)"),
      row("CGN counterfactuals", runs["counterfactual"],
          f"{paper:.1f}% (10 epochs)" if paper is not None else "-"),
      "  * the mean over the epoch's batches, the CNN still learning; test is the final CNN",
      f"counterfactuals: {gen.dataset_size:,} ({gen.no_cfs} per mask) from {generator}"]
  if config.generate.checkpoint:
    lines.append(f"the CGN trained in {cgn_dir} ({config.cgn.train.num_steps} steps) only shows "
                 "the training loop (its samples: cgn/samples); no classifier used it")
  else:
    lines.append("the counterfactuals come from the briefly trained CGN: expect near-chance "
                 "accuracy")
  return "\n".join(lines)
