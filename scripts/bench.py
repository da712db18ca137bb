"""Benchmark (not a test): every CPU row of the README's table, this project vs the authors' code.

    python scripts/bench.py --authors-repo /path/to/counterfactual_generative_networks \
        [--rows cgn_step classifier_step generate biggan u2net] [--threads 1 all] [--rounds 3] \
        [--torch-python /path/to/python] [--out bench.json] [--markdown bench.md]

Each (row, batch, thread count) runs in two fresh worker processes of this script, one JAX and one
PyTorch, driven call by call from here so that their calls interleave (JAX, torch, JAX, ...): a
load that drifts during the run then hits both sides alike. One thread means
``torch.set_num_threads(1)``, XLA's single-thread flags, and both workers pinned to the same core;
``all`` is the machine's default threading. Reported per side: median process-CPU and wall seconds
per call, the first call (compilation for JAX, warm-up for torch) and peak resident memory
(``ru_maxrss``, a fresh process per row). Ratios are torch time / JAX time, so > 1 means JAX is
faster. The torch side imports the authors' classes from ``--authors-repo`` (never copied) and, for
BigGAN, pytorch-pretrained-biggan (``pip install --no-deps pytorch-pretrained-biggan``);
``--torch-python`` runs it in another virtualenv. Without ``--authors-repo`` only JAX is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

from bench_common import cpu_model, pin_xla_single_thread  # noqa: E402
from bench_rows import ROWS  # noqa: E402


def worker(side: str, row: str, batch: int, threads: int, repo: str) -> None:
  """Builds one row's step, then answers each "run" line on stdin with [wall, cpu] seconds."""
  proto = os.fdopen(os.dup(1), "w")  # the protocol's own channel; stray prints go to stderr
  os.dup2(2, 1)
  say = lambda obj: (proto.write(json.dumps(obj) + "\n"), proto.flush())
  if threads == 1:
    pin_xla_single_thread()
  import bench_rows  # pylint: disable=import-outside-toplevel
  if side == "torch":
    import torch  # pylint: disable=import-outside-toplevel
    if threads == 1:
      torch.set_num_threads(1)
    fn, version = bench_rows.torch_row(row, batch, repo), f"torch {torch.__version__}"
  else:
    import jax  # pylint: disable=import-outside-toplevel
    fn, version = bench_rows.jax_row(row, batch), f"jax {jax.__version__}"
  t = time.perf_counter()
  fn()
  say({"first_s": time.perf_counter() - t, "version": version})
  for line in sys.stdin:
    if line.strip() != "run":
      break
    t, c = time.perf_counter(), time.process_time()
    fn()
    say([time.perf_counter() - t, time.process_time() - c])
  say({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


class _Worker:
  """A worker process of this script, spoken to one JSON line at a time."""

  def __init__(self, python: str, side: str, row: str, batch: int, threads: int, repo: str,
               core: int | None):
    cmd = [python, os.path.abspath(__file__), "--worker", side, "--row", row, "--batch", str(batch),
           "--threads", str(threads), "--authors-repo", repo or ""]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(_HERE), _HERE]))
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env, preexec_fn=(lambda: os.sched_setaffinity(0, {core}))
                                 if core is not None else None)
    self.ready = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"error: a worker ({' '.join(self.proc.args[2:8])}) died; see its output above")
    return json.loads(line)

  def run(self) -> list[float]:
    self.proc.stdin.write("run\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> float:
    self.proc.stdin.write("quit\n")
    self.proc.stdin.flush()
    peak = self._read()["peak_rss_mb"]
    self.proc.wait()
    return peak


def measure(row: str, batch: int, threads: int, args) -> dict:
  core = args.core if threads == 1 else None
  sides = {"jax": sys.executable}
  if args.authors_repo:
    sides["torch"] = args.torch_python
  workers = {s: _Worker(py, s, row, batch, threads, args.authors_repo, core) for s, py in sides.items()}
  calls = {s: [] for s in workers}
  for _ in range(args.rounds):
    for s, w in workers.items():
      calls[s].append(w.run())
  out = {"row": row, "batch": batch, "threads": threads}
  for s, w in workers.items():
    wall, cpu = np.median(np.array(calls[s]), axis=0)
    out[s] = {"wall_s": float(wall), "cpu_s": float(cpu), "first_s": w.ready["first_s"],
              "version": w.ready["version"], "peak_rss_mb": w.close()}
  if "torch" in out:
    out["ratio_cpu"] = out["torch"]["cpu_s"] / out["jax"]["cpu_s"]
    out["ratio_wall"] = out["torch"]["wall_s"] / out["jax"]["wall_s"]
  return out


def markdown(results: list[dict]) -> str:
  lines = ["| step | batch | threads | JAX CPU s | torch CPU s | ratio (CPU) | JAX wall s | "
           "torch wall s | ratio (wall) | JAX compile s | peak MB JAX / torch |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    if r.get("error"):
      lines.append(f"| {ROWS[r['row']][1]} | {r['batch']} | {r['threads']} | failed: {r['error']} |")
      continue
    j, t = r["jax"], r.get("torch")
    f = lambda side, k: f"{side[k]:.3f}" if side else "—"
    ratio = lambda k: f"**{r[k]:.2f}**" if k in r else "—"
    lines.append(f"| {ROWS[r['row']][1]} | {r['batch']} | {r['threads']} | {f(j, 'cpu_s')} | "
                 f"{f(t, 'cpu_s')} | {ratio('ratio_cpu')} | {f(j, 'wall_s')} | {f(t, 'wall_s')} | "
                 f"{ratio('ratio_wall')} | {j['first_s']:.1f} | {j['peak_rss_mb']:.0f} / "
                 f"{t['peak_rss_mb'] if t else 0:.0f} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--authors-repo", default="", help="checkout of the authors' code (torch side)")
  p.add_argument("--torch-python", default=sys.executable, help="python that runs the torch side")
  p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
  p.add_argument("--batch", type=int, nargs="+", default=None, help="override the rows' batch sizes")
  p.add_argument("--threads", nargs="+", default=["1", "all"], help="1 and/or all")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)),
                 help="the core single-thread workers are pinned to")
  p.add_argument("--out", default="", help="write every figure as JSON here")
  p.add_argument("--markdown", default="", help="write the table here")
  p.add_argument("--worker", default="", choices=["", "jax", "torch"], help=argparse.SUPPRESS)
  p.add_argument("--row", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    worker(args.worker, args.row, args.batch[0], int(args.threads[0]), args.authors_repo)
    return
  if args.authors_repo and not os.path.isdir(os.path.join(args.authors_repo, "mnists")):
    p.error(f"--authors-repo {args.authors_repo} is not a checkout of the authors' code "
            "(no mnists/ in it); git clone autonomousvision/counterfactual_generative_networks")
  for t in args.threads:
    if t not in ("1", "all"):
      p.error(f"--threads takes 1 and/or all, not '{t}'")
  header = (f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
            f"{args.rounds} interleaved rounds, medians")
  print(header, flush=True)
  results = []
  for t in args.threads:
    threads = 1 if t == "1" else 0
    for row in args.rows:
      for batch in args.batch or ROWS[row][0]:
        try:
          r = measure(row, batch, threads, args)
        except SystemExit as e:  # a worker died: say so in the table and go on with the next row
          print(e, file=sys.stderr)
          r = {"row": row, "batch": batch, "jax": None, "error": str(e)}
        r["threads"] = t
        results.append(r)
        print(markdown([r]).splitlines()[-1], flush=True)
  table = markdown(results)
  print(f"\n{header}\n\n{table}")
  if args.out:
    with open(args.out + ".tmp", "w") as f:
      json.dump({"machine": header, "results": results}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
  if args.markdown:
    with open(args.markdown + ".tmp", "w") as f:
      f.write(f"{header}\n\n{table}\n")
    os.replace(args.markdown + ".tmp", args.markdown)


if __name__ == "__main__":
  main()
