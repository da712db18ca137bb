"""Reproduces the MNIST classification table (paper Table 2: Original, GAN and CGN rows).

For each variant, the CNN is trained on one source and tested on the variant's real,
colour/texture-randomised test split:

* ``real``: the real, biased training split (the "Original" row);
* ``gan``: samples of a class-conditional GAN (configs/mnist_gan.py) trained here on that split
  for ``--gan_steps`` steps (the "GAN" row);
* ``counterfactual``: counterfactuals from the authors' converted CGN checkpoint (the "CGN" row,
  the paper's protocol);
* ``mixed``: counterfactuals + real images (the [Re] report's "with real images").

Prints a Markdown table (ours beside the paper's and the [Re] report's numbers) and writes it to
``<workdir>/table.md`` (and ``table.json``) after every finished cell. Every stage reruns, resumes
or reuses its job in ``<workdir>/<variant>/``; ``--reuse FILE.json`` (``{variant: {mode: acc}}``)
fills cells measured elsewhere instead, marked with an asterisk; ``--table_only`` runs nothing and
tabulates the classifier results already in the workdir (for these settings).

  python scripts/reproduce_mnist_table.py --data_dir ../shared/data --workdir runs/table \
      --dataset_size 100000 --no_cfs 10 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import time

from configs import mnist_classifier, mnist_gan, mnist_generate
from configs.common import DATA_DIR
from cgn_jax.jobs import run_job

VARIANTS = ("colored_MNIST", "double_colored_MNIST", "wildlife_MNIST")
MODES = ("real", "gan", "counterfactual", "mixed")
ROW_NAMES = {"real": "Original", "gan": "GAN", "counterfactual": "CGN",
             "mixed": "CGN + real"}
# Paper Table 2, test accuracy: the shaded (paper) cells of the [Re] README's Table 3
# (ddgoede/Re-CGN media/claim_3_odr_mnists.png); the paper has no "CGN + real" row.
PAPER = {"real": {"colored_MNIST": 35.9, "double_colored_MNIST": 10.3, "wildlife_MNIST": 10.1},
         "gan": {"colored_MNIST": 40.7, "double_colored_MNIST": 10.8, "wildlife_MNIST": 10.4},
         "counterfactual": {"colored_MNIST": 95.1, "double_colored_MNIST": 89.0,
                            "wildlife_MNIST": 85.7}}
# The [Re] report: its own runs in the same README table; "mixed" is its Table 3 "pre-trained,
# with real images" (the authors' CGN checkpoints, as here).
RE = {"real": {"colored_MNIST": 37.6, "double_colored_MNIST": 10.5, "wildlife_MNIST": 10.8},
      "gan": {"colored_MNIST": 32.5, "double_colored_MNIST": 10.6, "wildlife_MNIST": 11.2},
      "counterfactual": {"colored_MNIST": 92.3, "double_colored_MNIST": 86.5,
                         "wildlife_MNIST": 81.4},
      "mixed": {"colored_MNIST": 96.98, "double_colored_MNIST": 92.29, "wildlife_MNIST": 88.35}}


def table(rows: dict, args, modes=MODES) -> str:
  """Rows Original / GAN / CGN (/ CGN + real); per variant ours, the paper's, the [Re] report's."""
  head = "| row | " + " | ".join(f"{v} ours | paper | [Re]" for v in args.variants) + " |"
  lines = [head, "|---|" + "---|---|---|" * len(args.variants)]
  fmt = lambda x: "—" if x is None else (f"{x:.2f}" if isinstance(x, float) else str(x))
  starred = False
  for mode in modes:
    cells = []
    for v in args.variants:
      r = rows.get(v, {})
      ours = fmt(r.get(mode))
      if mode in r.get("reused", ()):
        ours, starred = ours + "*", True
      published = [PAPER.get(mode, {}).get(v), RE.get(mode, {}).get(v)]
      cells += [ours] + ["—" if x is None else str(x) for x in published]  # as printed
    lines.append(f"| {ROW_NAMES[mode]} | " + " | ".join(cells) + " |")
  real = (f"a seeded {args.real_max_images:,}-image subset of the real training split"
          if args.real_max_images > 0 else "the real training split")
  setting = {"real": f"Original: {real}, {args.real_epochs} epoch(s).",
             "gan": f"GAN: {_gan_steps_text(args)} of batch 16, {args.gan_dataset_size:,} samples "
                    f"({args.gan_no_cfs} per label draw), {args.gan_epochs} epochs.",
             "counterfactual": f"CGN: {args.dataset_size:,} counterfactuals ({args.no_cfs} per "
                               f"mask), {args.epochs} epochs.",
             "mixed": "CGN + real: the same counterfactuals and the real training split."}
  lines += ["", " ".join(["Test accuracy (%) on the real, randomised test split."] +
                         [setting[m] for m in modes if _measured(rows, m)])]
  if starred:
    lines.append(f"* taken from {args.reuse} (measured earlier), not run by this invocation.")
  return "\n".join(lines)


def _measured(rows: dict, mode: str) -> bool:
  """Whether some cell of ``mode`` was measured in this workdir (not reused, not missing)."""
  return any(mode in r and mode not in r.get("reused", ()) for r in rows.values())


def _gan_steps_text(args) -> str:
  if args.gan_steps > 0:
    return f"GAN trained {args.gan_steps:,} steps"
  return "GAN trained [Re]'s steps (" + ", ".join(
      f"{mnist_gan.RE_STEPS[v]:,}" for v in args.variants) + ")"


def train_gan(v: str, args) -> str:
  """Trains (or reuses) the GAN of ``v`` and samples its dataset; returns the dataset dir."""
  gan_dir = os.path.join(args.workdir, v, "gan")
  cfg = mnist_gan.get_config(v)
  with cfg.unlocked():
    cfg.data_dir, cfg.log.progress_bar = args.data_dir, False
    cfg.dataset_dir = os.path.join(args.workdir, "data", v)
    if args.gan_steps > 0:
      cfg.train.num_steps = args.gan_steps
  run_job(cfg, gan_dir)
  gen = mnist_generate.get_config()
  with gen.unlocked():
    gen.dataset, gen.checkpoint = v, os.path.join(gan_dir, "generator")
    gen.dataset_size, gen.no_cfs, gen.progress_bar = args.gan_dataset_size, args.gan_no_cfs, False
  return run_job(gen, gan_dir)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default=DATA_DIR)
  p.add_argument("--workdir", default="runs/mnist_table")
  p.add_argument("--dataset_size", type=int, default=100000, help="CGN counterfactuals")
  p.add_argument("--no_cfs", type=int, default=10)
  p.add_argument("--epochs", type=int, default=10, help="classifier epochs on counterfactuals")
  p.add_argument("--real_epochs", type=int, default=0, help="Original row; 0: --epochs")
  p.add_argument("--real_max_images", type=int, default=0,
                 help="Original row: a seeded subset of the real split; 0: all of it")
  p.add_argument("--gan_steps", type=int, default=0, help="0: [Re]'s steps per variant")
  p.add_argument("--gan_dataset_size", type=int, default=0, help="0: --dataset_size")
  p.add_argument("--gan_no_cfs", type=int, default=0, help="0: --no_cfs")
  p.add_argument("--gan_epochs", type=int, default=0, help="0: --epochs")
  p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
  p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
  p.add_argument("--reuse", default="", help="JSON {variant: {mode: accuracy}} measured earlier")
  p.add_argument("--table_only", action="store_true",
                 help="run nothing: the table of the classifier results already in --workdir")
  args = p.parse_args(argv)
  args.real_epochs = args.real_epochs or args.epochs
  args.gan_epochs = args.gan_epochs or args.epochs
  args.gan_dataset_size = args.gan_dataset_size or args.dataset_size
  args.gan_no_cfs = args.gan_no_cfs or args.no_cfs
  reuse = {}
  if args.reuse:
    with open(args.reuse) as f:
      reuse = json.load(f)
  rows: dict = {v: {"reused": []} for v in args.variants}
  os.makedirs(args.workdir, exist_ok=True)

  def write():
    shown = [m for m in MODES if m in args.modes or any(m in r for r in rows.values())]
    with open(os.path.join(args.workdir, "table.md"), "w") as f:
      f.write(table(rows, args, shown) + "\n")
    with open(os.path.join(args.workdir, "table.json"), "w") as f:
      json.dump(rows, f, indent=1)
    return shown

  for v in args.variants:
    for mode, acc in reuse.get(v, {}).items():
      rows[v][mode] = acc
      rows[v]["reused"].append(mode)
  sources: dict = {}
  for mode in args.modes:  # the samples first (each reused once made), then the classifiers
    for v in args.variants:
      if mode in rows[v]["reused"]:
        continue
      name = f"clf_{mode}"
      if mode == "real" and args.real_max_images > 0:
        name = f"clf_real_{args.real_max_images}"
      if args.table_only:
        path = os.path.join(args.workdir, v, name, "results.json")
        if os.path.exists(path):
          with open(path) as f:
            res = json.load(f)
          rows[v][mode] = res["final_test_acc"]
          rows[v][f"{mode}_per_epoch"] = [e["test_acc"] for e in res["epochs"]]
        continue
      t0 = time.time()
      if mode in ("counterfactual", "mixed") and v not in sources:
        gen = mnist_generate.get_config()
        with gen.unlocked():
          gen.dataset = v
          gen.checkpoint = os.path.join(args.data_dir, "pretrained", "mnist_cgn", f"{v}.pth")
          gen.dataset_size, gen.no_cfs, gen.progress_bar = args.dataset_size, args.no_cfs, False
        sources[v] = run_job(gen, os.path.join(args.workdir, v))
      cf_dir = train_gan(v, args) if mode == "gan" else sources.get(v, "")
      clf = mnist_classifier.get_config()
      with clf.unlocked():
        clf.dataset, clf.cf_dataset_dir = v, cf_dir
        clf.train_on = {"real": "real", "gan": "counterfactual"}.get(mode, mode)
        clf.epochs = {"real": args.real_epochs, "gan": args.gan_epochs}.get(mode, args.epochs)
        clf.data_dir, clf.log.progress_bar = args.data_dir, False
        clf.real_dataset_dir = os.path.join(args.workdir, "data", v)
        if mode == "real":
          clf.max_train_images = args.real_max_images or -1
      res = run_job(clf, os.path.join(args.workdir, v, name))
      rows[v][mode] = res["final_test_acc"]
      rows[v][f"{mode}_per_epoch"] = [e["test_acc"] for e in res["epochs"]]
      rows[v][f"{mode}_s"] = round(time.time() - t0, 1)
      write()
  shown = write()
  print(table(rows, args, shown))


if __name__ == "__main__":
  main()
