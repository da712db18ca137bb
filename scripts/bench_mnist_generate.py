"""Benchmark (not a test): counterfactual MNIST images/s, our jitted generator vs the authors' loop.

    python scripts/bench_mnist_generate.py --authors-repo /tmp/cgn_authors \
        --checkpoint ../shared/data/pretrained/mnist_cgn/double_colored_MNIST.pth [--single-thread]

``--authors-repo`` is a checkout of autonomousvision/counterfactual_generative_networks. The PyTorch
side is their ``mnists/models/cgn.py::CGN`` run the way ``generate_cf_dataset``
(mnists/generate_data.py) runs it: for each batch of 100 shape labels one ``cgn(y)`` call for the
mask, then ``no_cfs`` calls of ``cgn(y, counterfactual=True)`` and the composite. Our side is
``generate_mnist.make_generate_fn`` with the config's sub-pixel upsampling, on the same weights.
Both time the images only (no file writing). Without ``--authors-repo`` only JAX is timed.
``--single-thread`` pins both to one thread (fair on a shared machine; see bench_u2net.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import time_interleaved  # noqa: E402  (scripts/ is on sys.path)
from configs.common import DATA_DIR


def load_authors_cgn(repo: str) -> type:
  """The authors' MNIST ``CGN`` class, imported from their files (never copied here).

  Their ``utils`` package pulls in plotting and evaluation code (matplotlib, torchvision, ...); the
  CGN needs only ``utils/train_utils.py`` and ``utils/patch_utils.py``, so a stand-in ``utils``
  module exposes just those two files.
  """
  def load(name: str, path: str) -> types.ModuleType:
    if not os.path.isfile(path):
      sys.exit(f"error: {path} not found; --authors-repo must be a checkout of the authors' code")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

  utils = types.ModuleType("utils")
  for part in ("train_utils", "patch_utils"):
    utils.__dict__.update(vars(load(f"authors_{part}", os.path.join(repo, "utils", f"{part}.py"))))
  sys.modules["utils"] = utils
  return load("authors_mnist_cgn", os.path.join(repo, "mnists", "models", "cgn.py")).CGN


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--authors-repo", default=None, help="checkout of the authors' code (PyTorch reference)")
  p.add_argument("--checkpoint", default=os.path.join(DATA_DIR,
                                                      "pretrained", "mnist_cgn", "double_colored_MNIST.pth"))
  p.add_argument("--batch", type=int, default=100, help="masks per batch (generate_cf_dataset: 100)")
  p.add_argument("--no_cfs", type=int, default=10)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--single-thread", action="store_true", help="one intra-op thread for JAX and torch")
  args = p.parse_args()
  if args.single_thread:  # XLA reads its flags when the backend starts, so before importing jax
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  import jax  # pylint: disable=import-outside-toplevel
  from configs import mnist_generate  # pylint: disable=import-outside-toplevel
  from cgn_jax.jobs.generate_mnist import make_generate_fn  # pylint: disable=import-outside-toplevel
  from cgn_jax.models import mnist_cgn  # pylint: disable=import-outside-toplevel

  cgn, variables = mnist_cgn.load(args.checkpoint, os.path.join("/tmp", "bench_mnist_generate"),
                                  family="mnist_cgn")
  cgn = cgn.clone(subpixel=mnist_generate.get_config().fast_upsample)
  fn = jax.jit(make_generate_fn(cgn, args.no_cfs))
  ys = np.random.default_rng(0).integers(0, 10, args.batch).astype(np.int32)
  n_images = args.batch * args.no_cfs
  t = time.perf_counter()
  jax.block_until_ready(fn(variables, ys, jax.random.key(0)))
  compile_s = time.perf_counter() - t
  calls = iter(range(10 ** 9))
  fns = {"jax": lambda: jax.block_until_ready(fn(variables, ys, jax.random.key(next(calls))))}
  print(f"jax {jax.__version__}, {jax.device_count()} device(s), {os.cpu_count()} CPUs; "
        f"{args.batch} masks x {args.no_cfs} counterfactuals per call")
  if args.authors_repo:
    import torch  # pylint: disable=import-outside-toplevel
    if args.single_thread:
      torch.set_num_threads(1)
    net = load_authors_cgn(args.authors_repo)().eval()
    net.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    net.batch_size = args.batch
    y_t = torch.from_numpy(ys.astype(np.int64))

    def authors_batch():  # generate_cf_dataset's loop body, under no_grad (which it omits)
      with torch.no_grad():
        mask, _, _ = net(y_t)
        for _ in range(args.no_cfs):
          _, foreground, background = net(y_t, counterfactual=True)
          (mask * foreground + (1 - mask) * background).cpu()

    fns["torch"] = authors_batch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  sec = time_interleaved(fns, args.reps)
  jw, jc = sec["jax"]
  line = f"JAX {n_images / jw:7.0f} img/s ({jw:.2f} s/call wall, {jc:.2f} s CPU; first call {compile_s:.0f} s)"
  if "torch" in sec:
    tw, tc = sec["torch"]
    line += (f" | PyTorch {n_images / tw:7.0f} img/s ({tw:.2f} s wall, {tc:.2f} s CPU)"
             f" | JAX/PyTorch speed {tw / jw:4.2f}x wall, {tc / jc:4.2f}x CPU")
  print(line)
  print(f"1e6 images: JAX {1e6 / (n_images / jw) / 60:.0f} min"
        + (f", PyTorch {1e6 / (n_images / sec['torch'][0]) / 60:.0f} min" if "torch" in sec else ""))


if __name__ == "__main__":
  main()
