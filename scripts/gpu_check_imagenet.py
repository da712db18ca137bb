"""Device check (not a test): every figure of one short GPU run, written to one JSON file.

    python scripts/gpu_check_imagenet.py [--json gpu_check.json] [--rows ...] [--budget_s 450]
        [--micro_batch_size 8] [--accum_steps 2] [--steps 3] [--dtypes float32 bfloat16]
    python scripts/gpu_check_imagenet.py --tiny   # the ':tiny' networks: checks the script on a CPU

Rows (each dtype of each row in its own child process, so that its peak memory is its own and an
out-of-memory or crash in one leaves the others untouched):
  biggan          BigGAN-deep-256 forward, batch 64: images/s and, in bfloat16, the fraction of the
                  device's bf16 peak it reaches (~78 GFLOP per 256x256 image; the peak from
                  ``--peak_tflops`` or the table below for known devices).
  u2net           U2NET forward at 256x256, batch 64.
  mnist_cgn_step  the MNIST CGN train step (G + D + VGG perceptual, double-colored config), batch 64.
  mnist_generate  counterfactual generation, 1000 masks x 10 per call.
  imagenet_cgn    one ImageNet-CGN training step of the real 256 config (four BigGAN-deep-256, U2NET,
                  VGG16 perceptual and texture losses), float32 and bfloat16.

The ImageNet row runs the training job's own step (cgn_jax/jobs/train_cgn_imagenet.py:
``make_train_step`` jitted with the job's shardings and donated state) with random weights
(``allow_random_init``; random VGG), so it needs no checkpoint. One *step* is one optimizer update over
``micro_batch_size * accum_steps`` generated samples. Printed for it: tracing + compile time, mean/min
seconds per step, seconds per micro-batch forward+backward, seconds per sample, samples/s, peak device
memory (``memory_stats()['peak_bytes_in_use']``; ``n/a`` on CPU) and XLA's estimate of the step's
temporary buffers. The [Re] report measured 0.5 s per batch-1 forward+backward pass of the authors'
PyTorch CGN on a GTX 1080 Ti; seconds per sample is the comparable unit. ``model.dtype='bfloat16'``
affects the CGN's networks only; VGG16 stays float32, as in the training job.

Budget: the whole run must fit in 8 minutes on one H200. Rows run in the order above (the cheap
ones first) and a row that would start after ``--budget_s`` seconds is skipped and says so; a child
still running at the budget's end is stopped. ``--tiny`` runs every row on the tiny networks in a
few minutes of a 2-core CPU (the tests run it with a subset of rows) and shows the plumbing, not a
speed. ``--lower_only`` stops the ImageNet row after tracing, e.g. to check the 256 graph on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

RE_SEC_PER_SAMPLE = 0.5  # [Re] report: 0.5 s per batch-1 iteration, GTX 1080 Ti
BIGGAN_FLOP_PER_IMAGE = 78e9  # BigGAN-deep-256 forward, multiply-adds counted as 2
# Dense bf16 peak (TFLOP/s) by device_kind substring, from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                    "V100": 125.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5": 459.0}
ROWS = ("biggan", "u2net", "mnist_cgn_step", "mnist_generate", "imagenet_cgn")
# (batch, tiny batch); bench_rows' row names
_NET_ROWS = {"biggan": ("biggan", 64, 2), "u2net": ("u2net", 64, 2),
             "mnist_cgn_step": ("cgn_step", 64, 4), "mnist_generate": ("generate", 1000, 4)}
GIB = 2.0 ** 30
_T0 = time.time()


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')} +{time.time() - _T0:6.1f}s] {msg}", flush=True)


def _is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def measure_network(args: argparse.Namespace, row: str, dtype: str) -> dict:
  """Times one of the network rows (``_NET_ROWS``) with the benchmark's own builders."""
  # pylint: disable=import-outside-toplevel
  if args.compile_cache:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", args.compile_cache)
  import jax
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_rows
  name, batch, tiny_batch = _NET_ROWS[row]
  batch = args.batch or (tiny_batch if args.tiny else batch)
  images = batch * (2 if args.tiny else bench_rows.NO_CFS) if row == "mnist_generate" else batch
  dev = jax.devices()[0]
  result = {"row": row, "dtype": dtype, "batch": batch, "device": f"{dev.platform}: {dev.device_kind}",
            "devices": jax.device_count(), "tiny": args.tiny, "jax": jax.__version__}
  log(f"{row} {dtype}: building (batch {batch}{', tiny networks' if args.tiny else ''}) ...")
  try:
    t = time.perf_counter()
    fn = bench_rows.jax_row(name, batch, dtype, tiny=args.tiny)
    fn()
    result["first_call_s"] = time.perf_counter() - t  # build + compile + one call
    times = []
    for _ in range(args.steps):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
  except Exception as err:  # pylint: disable=broad-except
    if not _is_oom(err):
      raise
    result["error"] = f"out of memory at batch {batch}; try a smaller --batch"
    return result
  mean = sum(times) / len(times)
  result.update(call_s=times, call_mean_s=mean, call_min_s=min(times), images_per_call=images,
                images_per_s=images / min(times))
  if row == "biggan":
    achieved = BIGGAN_FLOP_PER_IMAGE * images / min(times)
    result["tflops"] = achieved / 1e12
    peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in dev.device_kind),
                                    None)
    result["bf16_peak_tflops"] = peak
    result["fraction_of_bf16_peak"] = achieved / (peak * 1e12) if peak else None
  result["peak_bytes"] = (dev.memory_stats() or {}).get("peak_bytes_in_use")
  log(f"{row} {dtype}: {result['images_per_s']:.1f} images/s, first call {result['first_call_s']:.1f} s")
  return result


def measure(args: argparse.Namespace, dtype: str) -> dict:
  """Builds the job's train step for ``dtype``, compiles it, times ``args.steps`` steps."""
  # pylint: disable=import-outside-toplevel
  if args.compile_cache:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", args.compile_cache)
  import jax
  import jax.numpy as jnp

  from cgn_jax import parallel
  from cgn_jax.jobs import train_cgn_imagenet as job
  from cgn_jax.models import imagenet_cgn, vgg

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "imagenet.py")
  spec = importlib.util.spec_from_file_location("imagenet_config", path)  # configs/ is no package
  config_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_module)
  config = config_module.get_config("tiny" if args.tiny else "")
  mesh = parallel.create_mesh()
  n_dev = mesh.devices.size
  micro = args.micro_batch_size or (4 if args.tiny else 8) * n_dev
  result = {"row": "imagenet_cgn",
            "model": "tiny (32 px, U2NETP)" if args.tiny else "256 (BigGAN-deep-256 x4, U2NET)",
            "dtype": dtype, "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
            "devices": n_dev, "micro_batch_size": micro, "accum_steps": args.accum_steps,
            "steps": args.steps, "jax": jax.__version__}
  parallel.check_batch_size(micro, mesh)
  config.allow_random_init = True
  config.biggan_checkpoint = config.u2net_checkpoint = config.vgg_checkpoint = config.cgn_checkpoint = ""
  config.train.micro_batch_size = micro
  config.train.accum_steps = args.accum_steps
  config.model.dtype = dtype
  log(f"{dtype}: {result['model']} on {n_dev} x {result['device']}, micro-batch {micro} x "
      f"{args.accum_steps} accumulated = {micro * args.accum_steps} samples per step")

  cfg = imagenet_cgn.config_from_fields(config.model)
  variables = imagenet_cgn.random_variables(cfg, config.seed)  # every checkpoint is empty
  features_fn = vgg.load_features_fn("", None, jax.random.key(config.seed + 2))
  trainable, frozen = imagenet_cgn.split_trainable(variables["params"])
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  result["trainable_params"], result["frozen_params"] = count(trainable), count(frozen)
  log(f"{dtype}: random weights ready ({result['trainable_params'] / 1e6:.1f} M trainable, "
      f"{result['frozen_params'] / 1e6:.1f} M frozen params in the CGN, plus VGG16)")

  model = imagenet_cgn.ImagenetCGN(cfg, dtype=jnp.dtype(dtype))
  tx = job.create_optimizer(config)
  repl = parallel.replicated(mesh)
  try:
    state = job.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           batch_stats=variables["batch_stats"], opt=tx.init(trainable))
    state, frozen = jax.device_put(state, repl), jax.device_put(frozen, repl)
    key = jax.random.key(config.seed + 3)
    train_step = job.make_train_step(config, model, tx, features_fn, mesh)  # the job's own step
    step_fn = jax.jit(lambda s, f, k: train_step(s, None, k, job.step_constants(config, f)),
                      in_shardings=(repl, repl, repl), out_shardings=(repl, repl), donate_argnums=(0,))
    log(f"{dtype}: tracing and lowering the train step ...")
    t = time.perf_counter()
    lowered = step_fn.lower(state, frozen, key)
    result["lower_s"] = time.perf_counter() - t
    if args.lower_only:
      log(f"{dtype}: lowered in {result['lower_s']:.1f} s (--lower_only: not compiled)")
      return result
    log(f"{dtype}: lowered in {result['lower_s']:.1f} s; compiling ...")
    t = time.perf_counter()
    compiled = lowered.compile()
    result["compile_s"] = time.perf_counter() - t
    mem = compiled.memory_analysis()
    result["xla_temp_bytes"] = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    log(f"{dtype}: compiled in {result['compile_s']:.1f} s; first (warm-up) step ...")
    t = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, frozen, key))
    result["first_step_s"] = time.perf_counter() - t
    result["loss_total"] = float(metrics["loss_total"])
    times = []
    for i in range(args.steps):
      t = time.perf_counter()
      state, metrics = jax.block_until_ready(compiled(state, frozen, key))
      times.append(time.perf_counter() - t)
      log(f"{dtype}: step {i + 1}/{args.steps}: {times[-1]:.3f} s")
  except Exception as err:  # pylint: disable=broad-except
    if not _is_oom(err):
      raise
    result["error"] = (f"out of memory at micro-batch {micro} ({str(err).splitlines()[0][:200]}); "
                       f"try a smaller --micro_batch_size (a multiple of {n_dev})")
    log(f"{dtype}: {result['error']}")
    return result
  samples = micro * args.accum_steps
  mean = sum(times) / len(times)
  result.update(step_s=times, step_mean_s=mean, step_min_s=min(times),
                micro_batch_s=mean / args.accum_steps, sec_per_sample=mean / samples,
                samples_per_s=samples / mean)
  stats = jax.devices()[0].memory_stats() or {}
  result["peak_bytes"] = stats.get("peak_bytes_in_use")
  return result


def run_child(args: argparse.Namespace, row: str, dtype: str, timeout: float) -> dict:
  """One row and dtype in a fresh process; a crash or the budget's end becomes an error entry."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--rows", row, "--dtypes", dtype,
           "--json", out, "--accum_steps", str(args.accum_steps), "--steps", str(args.steps)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--micro_batch_size", str(args.micro_batch_size)] if args.micro_batch_size else []
    cmd += ["--batch", str(args.batch)] if args.batch else []
    cmd += ["--peak_tflops", str(args.peak_tflops)] if args.peak_tflops else []
    cmd += ["--compile_cache", args.compile_cache] if args.compile_cache else []
    cmd += ["--lower_only"] if args.lower_only else []
    try:
      rc = subprocess.call(cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
      return {"row": row, "dtype": dtype, "error": f"stopped at the time budget ({timeout:.0f} s left)"}
    if os.path.exists(out):
      with open(out) as f:
        return json.load(f)[0]
    return {"row": row, "dtype": dtype,
            "error": f"child process exited with status {rc} (see its output above)"}


def measure_one(args: argparse.Namespace, row: str, dtype: str) -> dict:
  return measure(args, dtype) if row == "imagenet_cgn" else measure_network(args, row, dtype)


def _gib(n) -> str:
  return "n/a" if n is None else f"{n / GIB:.2f}"


def report(results: list[dict], tiny: bool) -> None:
  nets = [r for r in results if r.get("row") != "imagenet_cgn"]
  results = [r for r in results if r.get("row") == "imagenet_cgn"]
  if nets:
    print("\n| row | dtype | device | batch | first call s | s per call (min) | images/s | TFLOP/s "
          "| of bf16 peak | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
  for r in nets:
    if "error" in r:
      print(f"| {r['row']} | {r['dtype']} | {r.get('device', '?')} | {r.get('batch', '?')} | "
            f"{r['error']} |")
      continue
    frac = r.get("fraction_of_bf16_peak")
    print(f"| {r['row']} | {r['dtype']} | {r['devices']} x {r['device']} | {r['batch']} | "
          f"{r['first_call_s']:.1f} | {r['call_min_s']:.4f} | {r['images_per_s']:.1f} | "
          f"{r['tflops']:.1f} | {'' if frac is None else f'{100 * frac:.1f} %'} | "
          f"{_gib(r['peak_bytes'])} |" if "tflops" in r else
          f"| {r['row']} | {r['dtype']} | {r['devices']} x {r['device']} | {r['batch']} | "
          f"{r['first_call_s']:.1f} | {r['call_min_s']:.4f} | {r['images_per_s']:.1f} | | | "
          f"{_gib(r['peak_bytes'])} |")
  if not results:
    return
  print("\n| model | dtype | device | micro batch x accum | lower + compile s | step s mean / min | "
        "s per micro-batch | s per sample | samples/s | peak GiB | XLA temp GiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    if "compile_s" not in r and "error" not in r:
      print(f"| {r['model']} | {r['dtype']} | {r['devices']} x {r['device']} | "
            f"{r['micro_batch_size']} x {r['accum_steps']} | lowered in {r['lower_s']:.1f} s, not compiled |")
      continue
    if "error" in r:
      print(f"| {r.get('model', '?')} | {r['dtype']} | {r.get('device', '?')} | "
            f"{r.get('micro_batch_size', '?')} x {r.get('accum_steps', '?')} | {r['error']} |")
      continue
    print(f"| {r['model']} | {r['dtype']} | {r['devices']} x {r['device']} | "
          f"{r['micro_batch_size']} x {r['accum_steps']} | {r['lower_s']:.0f} + {r['compile_s']:.0f} | "
          f"{r['step_mean_s']:.3f} / {r['step_min_s']:.3f} | {r['micro_batch_s']:.3f} | "
          f"{r['sec_per_sample']:.4f} | {r['samples_per_s']:.2f} | {_gib(r['peak_bytes'])} | "
          f"{_gib(r['xla_temp_bytes'])} |")
  print()
  for r in results:
    if "compile_s" not in r or "error" in r:
      continue
    # The full schedule of configs/imagenet.py: 300 episodes x 4000 samples.
    full_h = 300 * 4000 * r["sec_per_sample"] / 3600
    note = " (tiny model: plumbing check, not comparable)" if tiny else ""
    print(f"{r['dtype']}: {r['sec_per_sample']:.4f} s per sample vs [Re] {RE_SEC_PER_SAMPLE} s per "
          f"batch-1 iteration (GTX 1080 Ti): {RE_SEC_PER_SAMPLE / r['sec_per_sample']:.2f}x its speed; "
          f"full 300 x 4000 schedule ~ {full_h:.1f} h here vs ~167 h{note}; loss_total {r['loss_total']:.4g}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="the tiny networks (CPU check)")
  p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
  p.add_argument("--batch", type=int, default=0, help="batch of the network rows (default per row)")
  p.add_argument("--budget_s", type=float, default=450.0,
                 help="skip rows that would start after this many seconds (the run must fit in 8 min)")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="the device's dense bf16 peak, if its kind is not in the built-in table")
  p.add_argument("--micro_batch_size", type=int, default=0,
                 help="global micro-batch (default: 8 per device, 4 with --tiny)")
  p.add_argument("--accum_steps", type=int, default=2, help="micro-batches per optimizer update")
  p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
  p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"],
                 help="default: float32 bfloat16; float32 alone with --tiny (CPU bf16 compiles ~2x slower)")
  p.add_argument("--json", default="", help="write the results here")
  p.add_argument("--compile_cache", default="", help="JAX persistent compilation cache directory")
  p.add_argument("--lower_only", action="store_true",
                 help="stop after tracing/lowering (checks the 256 config's graph on a CPU in ~1 min)")
  p.add_argument("--in_process", action="store_true",
                 help="measure in this process (no children; the peak memory then accumulates over dtypes)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # run_child's: no table
  args = p.parse_args()
  args.dtypes = args.dtypes or (["float32"] if args.tiny else ["float32", "bfloat16"])

  # The MNIST rows are float32 only, as their jobs.
  jobs = [(row, d) for row in args.rows for d in args.dtypes
          if d == "float32" or row in ("biggan", "u2net", "imagenet_cgn")]
  if args.in_process or args.child:
    results = [measure_one(args, row, d) for row, d in jobs]
  else:
    results = []
    for row, d in jobs:
      left = args.budget_s - (time.time() - _T0)
      if left <= 0:
        results.append({"row": row, "dtype": d, "error": f"skipped: past the {args.budget_s:.0f} s budget"})
        log(f"--- {row} {d}: skipped (budget) ---")
        continue
      log(f"--- {row} {d} (child process) ---")
      results.append(run_child(args, row, d, timeout=left))
  if args.json:
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump(results, f, indent=1)
    os.replace(tmp, args.json)
  if not args.child:
    report(results, args.tiny)
    log("done")


if __name__ == "__main__":
  main()
