"""Test accuracy against the number of counterfactuals (the [Re] report's appendix figure).

For each variant and each count N: N counterfactuals (``--no_cfs`` per mask) from the authors'
converted CGN checkpoint, the CNN trained on them alone for ``--epochs`` (the paper's protocol),
tested on the variant's real, randomised test split. Writes ``<workdir>/curve.json`` after every
point, a Markdown table, and a PNG (log x-axis) with the [Re] report's points beside ours.

  python scripts/cf_count_curve.py --data_dir ../shared/data --workdir runs/curve \
      --counts 10000 100000 1000000 --out docs/img/cf_count_curve.png

Every point reruns (or reuses, or resumes) the jobs in ``<workdir>/<variant>/n<N>``. ``--reuse
FILE.json`` takes points measured elsewhere instead (``{variant: {N: {"test_acc": .., "note":
..}}}``; a note starting with "reused" is drawn hollow and quoted under the figure);
``--plot_only`` runs nothing. The figure needs the ``plot`` extra (``pip install -e .[plot]``,
matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import time

VARIANTS = ("colored_MNIST", "double_colored_MNIST", "wildlife_MNIST")
SHORT = {"colored_MNIST": "Colored", "double_colored_MNIST": "Double-colored",
         "wildlife_MNIST": "Wildlife"}
# The [Re] report's ablation over the counterfactual count, 10 per mask (ddgoede/Re-CGN,
# experiments/results/cache/mnist_ablation_on_cfs.json, keys <variant>_counterfactual_<N>_10).
RE_POINTS = {"colored_MNIST": {10000: 89.13, 100000: 92.67, 1000000: 92.31},
             "double_colored_MNIST": {10000: 73.93, 100000: 89.18, 1000000: 89.4},
             "wildlife_MNIST": {10000: 47.85, 100000: 83.32, 1000000: 84.55}}
# The paper's Table 2, CGN row (its counterfactual count is not stated beside the table).
PAPER_CGN = {"colored_MNIST": 95.1, "double_colored_MNIST": 89.0, "wildlife_MNIST": 85.7}


def run_point(variant: str, n: int, args) -> dict:
  """Generates ``n`` counterfactuals and trains the CNN on them; returns the point's record."""
  from configs import mnist_classifier, mnist_generate  # pylint: disable=import-outside-toplevel
  from cgn_jax.jobs import run_job  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  point_dir = os.path.join(args.workdir, variant, f"n{n}")
  gen = mnist_generate.get_config()
  with gen.unlocked():
    gen.dataset = variant
    gen.checkpoint = os.path.join(args.data_dir, "pretrained", "mnist_cgn", f"{variant}.pth")
    gen.dataset_size, gen.no_cfs, gen.progress_bar = n, args.no_cfs, False
  cf_dir = run_job(gen, point_dir)
  t_gen = time.time() - t0
  clf = mnist_classifier.get_config()
  with clf.unlocked():
    clf.dataset, clf.train_on, clf.cf_dataset_dir = variant, "counterfactual", cf_dir
    clf.data_dir, clf.epochs, clf.log.progress_bar = args.data_dir, args.epochs, False
    clf.real_dataset_dir = os.path.join(args.workdir, "data", variant)
  res = run_job(clf, os.path.join(point_dir, "clf"))
  return {"test_acc": res["final_test_acc"], "epochs": args.epochs, "no_cfs": args.no_cfs,
          "per_epoch": [e["test_acc"] for e in res["epochs"]], "generate_s": round(t_gen, 1),
          "classifier_s": round(time.time() - t0 - t_gen, 1), "note": "measured by this driver"}


def stored_point(variant: str, n: int, args) -> dict | None:
  """The record of a finished point from its classifier's results.json, or None."""
  path = os.path.join(args.workdir, variant, f"n{n}", "clf", "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    res = json.load(f)
  if len(res.get("epochs", [])) != args.epochs:
    return None
  return {"test_acc": res["final_test_acc"], "epochs": args.epochs, "no_cfs": args.no_cfs,
          "per_epoch": [e["test_acc"] for e in res["epochs"]], "note": "measured by this driver"}


def table(points: dict, variants) -> str:
  """A Markdown table: one row per variant and count, ours beside [Re]'s."""
  lines = ["| variant | counterfactuals | ours (test acc. %) | epochs | [Re] report | source |",
           "|---|---|---|---|---|---|"]
  for v in variants:
    counts = sorted(set(map(int, points.get(v, {}))) | set(RE_POINTS.get(v, {})))
    for n in counts:
      p = points.get(v, {}).get(str(n)) or points.get(v, {}).get(n) or {}
      ours = f"{p['test_acc']:.2f}" if "test_acc" in p else "—"
      re = RE_POINTS.get(v, {}).get(n)
      lines.append(f"| {v} | {n:,} | {ours} | {p.get('epochs', '—')} | "
                   f"{re if re is not None else '—'} | {p.get('note', '—') if p else '—'} |")
  return "\n".join(lines)


def plot(points: dict, variants, out: str) -> str:
  """The figure: per variant one colour; ours filled (measured here) or hollow (reused), [Re]
  dashed, the paper's Table 2 value dotted."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
  colours = dict(zip(VARIANTS, ("tab:red", "tab:blue", "tab:green")))
  notes = []
  for v in variants:
    c = colours.get(v, "black")
    mine = sorted((int(n), p) for n, p in points.get(v, {}).items() if "test_acc" in p)
    if mine:
      ax.plot([n for n, _ in mine], [p["test_acc"] for _, p in mine], "-", color=c,
              label=f"{SHORT.get(v, v)}, ours")
      for n, p in mine:
        reused = p.get("note", "").startswith("reused")
        ax.plot([n], [p["test_acc"]], "o", color=c, mfc="white" if reused else c, ms=7)
        if reused and p["note"] not in notes:
          notes.append(p["note"])
    re = sorted(RE_POINTS.get(v, {}).items())
    if re:
      ax.plot([n for n, _ in re], [a for _, a in re], "s--", color=c, alpha=0.45, ms=5,
              label=f"{SHORT.get(v, v)}, [Re] report")
    if v in PAPER_CGN:
      ax.axhline(PAPER_CGN[v], color=c, ls=":", lw=1)
  ax.set_xscale("log")
  ax.set_xlabel("counterfactual training images (10 per mask)")
  ax.set_ylabel("test accuracy (%), real randomised test split")
  ax.set_title("CNN trained on CGN counterfactuals only", fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  caption = "dotted: paper Table 2 (CGN); filled: measured by this driver" + (
      "; hollow: " + "; ".join(notes) if notes else "")
  fig.text(0.01, 0.01, textwrap.fill(caption, 150), fontsize=6, va="bottom")
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out)
  plt.close(fig)
  return out


def main(argv=None):
  from configs.common import DATA_DIR  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default=DATA_DIR)
  p.add_argument("--workdir", default="runs/cf_count_curve")
  p.add_argument("--variants", nargs="*", default=list(VARIANTS))
  p.add_argument("--counts", nargs="*", type=int, default=[10000, 100000, 1000000])
  p.add_argument("--no_cfs", type=int, default=10)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--reuse", default="", help="JSON of points measured elsewhere (see docstring)")
  p.add_argument("--out", default="", help="the PNG; default <workdir>/cf_count_curve.png")
  p.add_argument("--plot_only", action="store_true",
                 help="run nothing: the table and figure of <workdir>/curve.json and --reuse")
  args = p.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  reuse = {}
  if args.reuse:
    with open(args.reuse) as f:
      reuse = json.load(f)
  out_json = os.path.join(args.workdir, "curve.json")
  points: dict = {}
  if os.path.exists(out_json):  # the points of earlier invocations stay
    with open(out_json) as f:
      points = json.load(f)
  for v in args.variants:
    for n in args.counts:
      given = reuse.get(v, {}).get(str(n)) or (stored_point(v, n, args) if args.plot_only else None)
      if given:
        points.setdefault(v, {})[str(n)] = given
      elif not args.plot_only:
        points.setdefault(v, {})[str(n)] = run_point(v, n, args)
      else:
        continue
      with open(out_json, "w") as f:
        json.dump(points, f, indent=1)
  print(table(points, args.variants))
  print("figure:", plot(points, args.variants, args.out or os.path.join(args.workdir,
                                                                         "cf_count_curve.png")))
  return points


if __name__ == "__main__":
  main()
