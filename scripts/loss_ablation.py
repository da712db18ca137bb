"""Reproduces the ImageNet CGN's loss ablation (paper Table 1): Inception Score and mean mask.

For each row of configs/imagenet_ablation.py (full, no_shape, no_text, no_bg, no_rec): the ImageNet
CGN trained with that row's lambdas zeroed (job ``train_cgn_imagenet``), then its samples scored
(job ``evaluate_generation``: Inception Score of the composites, mean and spread of the per-image
mean mask mu_mask). Prints a Markdown table beside the paper's numbers and writes it to
``<workdir>/ablation.md`` (and ``ablation.json``) after every finished row. Rerunning the same
command resumes: a row whose metrics exist is not rerun, a row whose training finished is only
evaluated, an interrupted training resumes from its checkpoint; other settings in the same workdir
are refused.

  python scripts/loss_ablation.py --workdir runs/ablation --biggan_checkpoint=/ckpt/biggan256 \
      --u2net_checkpoint=/ckpt/u2net --vgg_checkpoint=/ckpt/vgg16 \
      --inception_checkpoint=pt_inception-2015-12-05-6726825d.pth
  # the plumbing on a CPU: random 32-px CGNs, the random-weight Inception fixture; measured: 350 s
  # of CPU for the first row (compiling), 60-100 s for each further one (cached compilation)
  python scripts/loss_ablation.py --tiny --workdir /tmp/ablation_tiny

``--train KEY=VALUE`` / ``--eval KEY=VALUE`` override any field of the training or evaluation config
(e.g. ``--train train.episodes=50``). The evaluation's defaults are [Re]'s counts
(experiments/inception_score.py: 2000 images at truncation 0.5, Inception Score over 2 splits) on
the FID Inception network (configs/generation_eval.py says why).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

import ml_collections

from cgn_jax import checkpoints
from cgn_jax.errors import InputError, closest
from cgn_jax.jobs import run_job
from configs import generation_eval, imagenet_ablation
from configs.common import apply_overrides

ROWS = imagenet_ablation.ROWS
METRICS = "generation_metrics.json"  # what evaluate_generation writes into its workdir
# [Re] experiments/inception_score.py generate_images + inception_score(splits=2, resize=True).
RE_EVAL = {"num_images": 2000, "truncation": 0.5, "splits": 2}
TINY_EVAL = {"num_images": 8, "batch_size": 4, "splits": 2}
TINY_TRAIN = {"train.episodes": 2, "log.checkpoint_every": 0, "log.sample_every": 0}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.environ.get("CGN_FIXTURES", os.path.join(_ROOT, "..", "shared", "fixtures"))


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _pairs(items) -> dict:
  out = {}
  for item in items or ():
    if "=" not in item:
      raise InputError(f"override '{item}' is not KEY=VALUE; write e.g. --train train.episodes=50")
    key, text = item.split("=", 1)
    out[key] = _value(text)
  return out


def _override(c: ml_collections.ConfigDict, fields: dict, flag: str) -> ml_collections.ConfigDict:
  """``apply_overrides`` for existing fields only: a misspelt key is an error, not a new field."""
  for dotted in fields:
    node, *path = c, *dotted.split(".")
    for i, part in enumerate(path):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        near = closest(part, node.keys()) if isinstance(node, ml_collections.ConfigDict) else None
        hint = f"; did you mean {'.'.join(path[:i] + [near])}?" if near else ""
        raise InputError(f"--{flag} {dotted}: the {c.job} config has no field "
                         f"{'.'.join(path[:i + 1])}{hint}")
      node = node[part]
  return apply_overrides(c, **fields)


def train_config(row: str, args) -> ml_collections.ConfigDict:
  c = imagenet_ablation.get_config(f"tiny_{row}" if args.tiny else row)
  paths = {k: getattr(args, k) for k in ("biggan_checkpoint", "u2net_checkpoint", "vgg_checkpoint")
           if getattr(args, k)}
  return _override(c, {**(TINY_TRAIN if args.tiny else {}), **paths, **_pairs(args.train)},
                   "train")


def inception_checkpoint(args) -> str:
  """The FID Inception weights: the flag, or with --tiny the random-weight test fixture."""
  path = args.inception_checkpoint or (
      os.path.join(FIXTURES, "inception_v3_fid.pth") if args.tiny else "")
  if not path:
    raise InputError("the Inception Score needs the FID Inception weights; pass "
                     "--inception_checkpoint=pt_inception-2015-12-05-6726825d.pth (or its "
                     "converted dir)")
  return path


def eval_config(train_dir: str, args) -> ml_collections.ConfigDict:
  c = generation_eval.get_config("tiny" if args.tiny else "")
  fields = {**(TINY_EVAL if args.tiny else RE_EVAL), "source": "cgn",
            "path": os.path.join(train_dir, "cgn"), "fid_reference": "",  # Table 1 has no FID
            "inception_checkpoint": inception_checkpoint(args)}
  return _override(c, {**fields, **_pairs(args.eval)}, "eval")


def check_inputs(args) -> None:
  """Builds every config once, so that a bad override or missing weights fail before any work."""
  for row in args.rows:
    train_config(row, args)
  eval_config("", args)


def _trained(train_dir: str, episodes: int) -> bool:
  """The training's export exists and is of its last episode."""
  try:
    return int(checkpoints.load_meta(os.path.join(train_dir, "cgn")).get("step", -1)) == episodes
  except (OSError, ValueError, KeyError, checkpoints.CheckpointError):
    return False


def _check_settings(workdir: str, settings: dict) -> None:
  """One workdir holds one ablation: a rerun with other settings is refused in one line."""
  path = os.path.join(workdir, "settings.json")
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    if old != settings:
      diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
      raise InputError(f"{workdir} holds an ablation run with other settings ({', '.join(diff)}); "
                       "rerun with the same options or use another --workdir")
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(settings, f, indent=1, sort_keys=True)


def run_row(row: str, args) -> dict:
  """Trains (unless done) and evaluates (unless done) one row; returns its metrics."""
  base = os.path.join(args.workdir, row)
  train_dir, eval_dir = os.path.join(base, "train"), os.path.join(base, "eval")
  done = os.path.join(eval_dir, METRICS)
  if os.path.isfile(done):
    with open(done) as f:
      return json.load(f)
  t0 = time.time()
  tc = train_config(row, args)
  if not _trained(train_dir, tc.train.episodes):
    run_job(tc, train_dir)
  t1 = time.time()
  run_job(eval_config(train_dir, args), eval_dir)  # writes `done` last
  print(f"{row}: trained in {t1 - t0:.0f} s, evaluated in {time.time() - t1:.0f} s", flush=True)
  with open(done) as f:
    return json.load(f)


def _pm(d: dict | None, key: str) -> str:
  if not d or key not in d or d[key] is None:
    return "—"
  mean, std = d[key].get("mean"), d[key].get("std")
  return f"{mean:.3g} ± {std:.2g}" if std is not None else f"{mean:.3g}"


def table(results: dict, args) -> str:
  t, e = train_config("full", args), eval_config("", args)
  what = (f"{t.train.episodes} episodes of {t.train.micro_batch_size * t.train.accum_steps} "
          f"samples; IS ({e.network} Inception) over {e.num_images} images in {e.splits} splits, "
          f"truncation {e.truncation}")
  if args.tiny:
    what += "; tiny configs, random weights: the pipeline, not the numbers"
  lines = [f"Loss ablation ({what}). IS: Inception Score of the composites; mu_mask: mean of the "
           "per-image mean masks (± their std).", "",
           "| row | lambdas zeroed | IS (ours) | IS (paper) | mu_mask (ours) | mu_mask (paper) |",
           "|---|---|---|---|---|---|"]
  for row in ROWS:
    r = results.get(row)
    zeroed = ", ".join(imagenet_ablation.ZEROED[row]) or "none"
    is_paper, mask_paper = imagenet_ablation.PAPER[row]
    lines.append(f"| {row} | {zeroed} | {_pm(r, 'inception_score')} | {is_paper} | "
                 f"{_pm(r, 'mask')} | {mask_paper} |")
  lines.append(f"| BigGAN-deep-256 | — | — | {imagenet_ablation.PAPER_BIGGAN_IS} | — | — |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/loss_ablation")
  p.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
  p.add_argument("--tiny", action="store_true", help="tiny configs: minutes on a CPU, no weights")
  p.add_argument("--biggan_checkpoint", default="", help="converted BigGAN-deep-256 (or its .bin)")
  p.add_argument("--u2net_checkpoint", default="", help="converted U2-Net (or u2net.pth)")
  p.add_argument("--vgg_checkpoint", default="", help="converted torchvision VGG16 (or its .pth)")
  p.add_argument("--inception_checkpoint", default="",
                 help="FID Inception weights (pt_inception-2015-12-05); --tiny: the test fixture")
  p.add_argument("--train", action="append", metavar="KEY=VALUE", help="training config override")
  p.add_argument("--eval", action="append", metavar="KEY=VALUE", help="evaluation config override")
  args = p.parse_args(argv)
  try:
    check_inputs(args)
    _check_settings(args.workdir, {k: v for k, v in vars(args).items()
                                   if k not in ("workdir", "rows")})
    results: dict = {}
    for row in ROWS:  # finished rows outside --rows still show in the table
      path = os.path.join(args.workdir, row, "eval", METRICS)
      if os.path.isfile(path):
        with open(path) as f:
          results[row] = json.load(f)
    for row in args.rows:
      results[row] = run_row(row, args)
      with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
        f.write(table(results, args) + "\n")
      with open(os.path.join(args.workdir, "ablation.json"), "w") as f:
        json.dump(results, f, indent=1)
  except InputError as e:
    sys.exit(f"error: {e}")
  print(table(results, args))
  return results


if __name__ == "__main__":
  main()
