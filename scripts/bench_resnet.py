"""Benchmark (not a test): the invariant ensemble's train step and evaluation forward, JAX jit vs
torchvision, side by side in one process tree.

    python scripts/bench_resnet.py --torch-python /path/to/venv_tv/bin/python [--batch 8]
        [--size 224] [--reps 3] [--dtype bfloat16] [--single-thread]

torchvision 0.29 needs torch 2.14.1, which is not the project's torch pin, so the reference runs in
its own virtualenv (``--torch-python``: ``python -m venv tv && tv/bin/pip install torch==2.14.1
torchvision==0.29.1``) as a child process that this script drives call by call, interleaved with the
JAX calls. Both sides use random weights (torchvision's ``resnet50()``; JAX's own initialisation)
and the same step: the ensemble (ResNet-50 backbone + shape/texture/background Linear heads) with
BatchNorm in eval mode, cross-entropy on the mean of the heads, SGD momentum 0.9, weight decay 1e-4
(the authors' imagenet/train_classifier.py). The evaluation forward returns every head. Throughput
excludes compilation (printed apart). ``--single-thread`` pins both sides to one thread.

On a GPU this is also the device check of the classifier step: without ``--torch-python``, e.g.
``--batch 256 --dtype bfloat16``, it prints images/s, compile time and the peak device memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import pin_xla_single_thread  # noqa: E402  (scripts/ is on sys.path)

# The torch side, run by ``--torch-python`` (never imported here): reads "train"/"eval" lines,
# answers one JSON line of wall and CPU seconds per call.
TORCH_WORKER = r"""
import json, sys, time
import torch, torchvision
from torch import nn
batch, size, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if threads > 0:
  torch.set_num_threads(threads)
torch.manual_seed(0)
backbone = nn.Sequential(*list(torchvision.models.resnet50().children())[:-1], nn.Flatten())
heads = nn.ModuleList([nn.Linear(2048, 1000) for _ in range(3)])
model = nn.ModuleDict({"backbone": backbone, "heads": heads})
for m in model.modules():
  if isinstance(m, nn.BatchNorm2d):
    m.eval()  # set_bn_eval
opt = torch.optim.SGD(model.parameters(), 1e-3, momentum=0.9, weight_decay=1e-4)
x = torch.randn(batch, 3, size, size)
y = torch.randint(0, 1000, (batch,))
def forward():
  f = backbone(x)
  outs = [h(f) for h in heads]
  return outs, sum(outs) / 3
def train():
  _, avg = forward()
  loss = nn.functional.cross_entropy(avg, y)
  loss.backward()
  opt.step()
  opt.zero_grad()
def evaluate():
  with torch.inference_mode():
    forward()
fns = {"train": train, "eval": evaluate}
print(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__,
                  "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
  fn = fns[line.strip()]
  t, c = time.perf_counter(), time.process_time()
  fn()
  print(json.dumps([time.perf_counter() - t, time.process_time() - c]), flush=True)
"""


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--torch-python", default=None,
                 help="python of a virtualenv with torch 2.14.1 + torchvision 0.29.1 (reference)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="JAX compute dtype")
  p.add_argument("--single-thread", action="store_true", help="one intra-op thread for JAX and torch")
  args = p.parse_args()
  if args.single_thread:
    pin_xla_single_thread()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from cgn_jax.jobs import train_classifier_imagenet as job  # pylint: disable=import-outside-toplevel
  from cgn_jax.models import resnet  # pylint: disable=import-outside-toplevel

  worker = None
  if args.torch_python:
    worker = subprocess.Popen(
        [args.torch_python, "-c", TORCH_WORKER, str(args.batch), str(args.size),
         "1" if args.single_thread else "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    print(f"reference: {worker.stdout.readline().strip()}")

  model = resnet.InvariantEnsemble(dtype=jnp.dtype(args.dtype))
  config = ml_collections.ConfigDict({"train": {
      "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 45, "lr_decay_every": 15}})
  tx, schedule = job.create_optimizer(config, steps_per_epoch=1000)
  t0 = time.perf_counter()
  variables = resnet.init_variables(model, jax.random.key(0), args.size)
  state = job.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                         batch_stats=variables["batch_stats"], opt=tx.init(variables["params"]))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; init "
        f"{time.perf_counter() - t0:.0f} s; batch {args.batch} at {args.size}px, JAX {args.dtype}")
  rng = np.random.default_rng(0)
  batch = {"real": {"image": jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)),
                                         jnp.float32),
                    "label": jnp.asarray(rng.integers(0, 1000, args.batch), jnp.int32)}}
  train = jax.jit(job.make_train_step(model, tx, schedule), donate_argnums=0)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  holder = {"state": state}

  def jax_train():
    holder["state"], m = train(holder["state"], batch)
    jax.block_until_ready(m)

  def jax_eval():
    s = holder["state"]
    jax.block_until_ready(forward({"params": s.params, "batch_stats": s.batch_stats},
                                  batch["real"]["image"]))

  for name, fn in (("train", jax_train), ("eval", jax_eval)):
    t = time.perf_counter()
    fn()
    compile_s = time.perf_counter() - t
    if worker:  # the reference's warm-up call
      worker.stdin.write(name + "\n")
      worker.stdin.flush()
      worker.stdout.readline()
    jt, tt = [], []
    for _ in range(args.reps):  # interleaved: JAX, torch, JAX, torch, ...
      t, c = time.perf_counter(), time.process_time()
      fn()
      jt.append((time.perf_counter() - t, time.process_time() - c))
      if worker:
        worker.stdin.write(name + "\n")
        worker.stdin.flush()
        tt.append(json.loads(worker.stdout.readline()))
    jw, jc = np.median(np.array(jt), axis=0)
    line = (f"{name:5s}: JAX {args.batch / jw:6.2f} img/s ({jw:6.2f} s wall, {jc:6.2f} s CPU; "
            f"first call {compile_s:.0f} s)")
    if worker:
      tw, tc = np.median(np.array(tt), axis=0)
      line += (f" | torchvision {args.batch / tw:6.2f} img/s ({tw:6.2f} s wall, {tc:6.2f} s CPU) | "
               f"JAX/torch speed {tw / jw:4.2f}x wall, {tc / jc:4.2f}x CPU")
    print(line, flush=True)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:  # accelerators only
    print(f"peak device memory {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
  if worker:
    worker.stdin.close()
    worker.wait()


if __name__ == "__main__":
  main()
