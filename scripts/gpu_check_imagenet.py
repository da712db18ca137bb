"""Device check (not a test): one ImageNet-CGN training episode, timed, in float32 and bfloat16.

    python scripts/gpu_check_imagenet.py [--micro_batch_size 8] [--accum_steps 2] [--steps 3] \
        [--dtypes float32 bfloat16] [--json OUT.json] [--compile_cache DIR]
    python scripts/gpu_check_imagenet.py --tiny   # the ':tiny' config: checks the script on a CPU

Runs the training job's own step (cgn_jax/jobs/train_cgn_imagenet.py: ``make_train_step`` jitted with
the job's shardings and donated state) on the real 256 config of configs/imagenet.py — four
BigGAN-deep-256, the full U2NET, VGG16 perceptual and texture losses — with random weights
(``allow_random_init``; random VGG), so it needs no checkpoint. One *step* is one optimizer update over
``micro_batch_size * accum_steps`` generated samples. Printed per dtype: tracing + compile time, mean/min
seconds per step, seconds per micro-batch forward+backward, seconds per sample, samples/s, peak device
memory (``memory_stats()['peak_bytes_in_use']``; ``n/a`` on CPU) and XLA's estimate of the step's
temporary buffers. The [Re] report measured 0.5 s per batch-1 forward+backward pass of the authors'
PyTorch CGN on a GTX 1080 Ti; seconds per sample is the comparable unit, and the last line gives
the ratio and the full 300 x 4000-sample schedule's duration at our rate.

Each dtype runs in its own child process, so that its peak memory is its own (the allocator's peak
never resets) and an out-of-memory in one leaves the other untouched. ``model.dtype='bfloat16'``
affects the CGN's networks only; VGG16 stays float32, as in the training job. Budget on an H200:
compiling the 256 step takes minutes per dtype (progress lines carry timestamps); the timed steps take
seconds. ``--tiny`` (float32 only unless ``--dtypes`` says otherwise) runs on a 2-core CPU in about
two and a half minutes, almost all of it compiling (both dtypes: ~7 min), and shows the plumbing, not
a speed. ``--lower_only`` stops after tracing the step, e.g. to check the 256 graph on a CPU.
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
GIB = 2.0 ** 30
_T0 = time.time()


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')} +{time.time() - _T0:6.1f}s] {msg}", flush=True)


def _is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


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
  result = {"model": "tiny (32 px, U2NETP)" if args.tiny else "256 (BigGAN-deep-256 x4, U2NET)",
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
    step_fn = jax.jit(lambda s, f, k: train_step(s, None, k, f),
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


def run_child(args: argparse.Namespace, dtype: str) -> dict:
  """``measure`` in a fresh process; a crash becomes an error entry."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--dtypes", dtype, "--json", out,
           "--accum_steps", str(args.accum_steps), "--steps", str(args.steps)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--micro_batch_size", str(args.micro_batch_size)] if args.micro_batch_size else []
    cmd += ["--compile_cache", args.compile_cache] if args.compile_cache else []
    cmd += ["--lower_only"] if args.lower_only else []
    rc = subprocess.call(cmd)
    if os.path.exists(out):
      with open(out) as f:
        return json.load(f)[0]
    return {"dtype": dtype, "error": f"child process exited with status {rc} (see its output above)"}


def _gib(n) -> str:
  return "n/a" if n is None else f"{n / GIB:.2f}"


def report(results: list[dict], tiny: bool) -> None:
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
  p.add_argument("--tiny", action="store_true", help="configs/imagenet.py:tiny (CPU check)")
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

  if args.in_process or args.child:
    results = [measure(args, d) for d in args.dtypes]
  else:
    results = []
    for d in args.dtypes:
      log(f"--- {d} (child process) ---")
      results.append(run_child(args, d))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  if not args.child:
    report(results, args.tiny)
    log("done")


if __name__ == "__main__":
  main()
