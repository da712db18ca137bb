"""A conv (NHWC/HWIO, square kernel, symmetric zero padding) whose kernel gradient is computed by a
rule chosen per shape by timing the candidates on the running CPU.

Why: XLA:CPU writes a conv's kernel gradient as another convolution whose window is the whole
output map. For the MNIST models' few-channel convs that is several times slower than the same sum
written as matmuls (the generator's upsampling conv, 64->32 channels at 32x32, batch 64: ~0.8 s of a
~5 s train step), and which matmul form wins differs between CPUs: the MNIST CNN's 5x5 3->32 conv
preferred the k*k-slices rule on an AMD EPYC and XLA's own gradient on an Intel Xeon. A constant
tuned on one machine loses on the next, so ``rule="auto"`` measures once per shape and CPU and keeps
the winner in a JSON cache.

Rules (all give the same values up to float rounding; the input gradient is always XLA's own):
  xla     XLA's own VJP.
  batchB  XLA's own kernel gradient per chunk of B images, summed. On XLA:CPU (YNNPACK) the
          kernel-gradient convolution slows down far more than linearly with the batch (the
          generator conv above: 29 ms at batch 16, 760 ms at 64; 87 ms as 32 chunks of 2).
  slices  dW[i, j] = window_ij(x)^T @ dY: k*k matmuls of (C_in x M) @ (M x C_out).
  rows    per kernel row i, the k column-shifted windows stacked channel-major: k matmuls of
          (k*C_in x M) @ (M x C_out) after one transpose of x.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import tempfile
import threading
import time

import jax
import jax.numpy as jnp

Array = jax.Array

BATCH_CHUNKS = (1, 2, 4, 8)
RULES = ("xla", "slices", "rows") + tuple(f"batch{b}" for b in BATCH_CHUNKS)
ENV_RULE = "CGN_CONV_DW"          # pins every conv to one rule (tests pin "xla")
ENV_CACHE = "CGN_CONV_DW_CACHE"   # where the measured choices are kept
MIN_MEASURED_FLOP = 2e7  # smaller kernel gradients keep XLA's rule without being timed
MARGIN = 0.9  # another rule must take < 90% of XLA's time, so that noise never picks an exotic one

_DN = ("NHWC", "HWIO", "NHWC")
_choices: dict[str, str] = {}
_lock = threading.Lock()


def conv(x: Array, kernel: Array, stride: int = 1, padding: int = 0, rule: str = "auto") -> Array:
  """``lax.conv_general_dilated`` (NHWC, HWIO) with the kernel gradient of ``rule``.

  "auto" is resolved only when the gradient is traced, so forward-only uses (init, evaluation,
  generation) never measure anything.
  """
  if rule == "xla":
    return _conv(x, kernel, stride, padding)
  if rule != "auto":
    _check(rule, x.shape[0])
  return _conv_custom_dw(x, kernel, stride, padding, rule)


def _check(rule: str, batch: int) -> None:
  if rule not in RULES or (rule.startswith("batch") and batch % int(rule[len("batch"):])):
    raise ValueError(f"conv kernel-gradient rule '{rule}' does not apply to a batch of {batch}; "
                     f"choose one of {', '.join(candidates(batch))} or auto")


def _conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding),) * 2,
                                      dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_custom_dw(x, kernel, stride, padding, rule):
  return _conv(x, kernel, stride, padding)


def _fwd(x, kernel, stride, padding, rule):
  return _conv(x, kernel, stride, padding), (x, kernel)


def _bwd(stride, padding, rule, res, g):
  x, kernel = res
  if rule == "auto":
    rule = choose(x.shape, kernel.shape, stride, padding, x.dtype)
  if rule == "xla":
    _, vjp = jax.vjp(lambda v, w: _conv(v, w, stride, padding), x, kernel)
    return vjp(g)
  _, vjp_x = jax.vjp(lambda v: _conv(v, kernel, stride, padding), x)
  (dx,) = vjp_x(g)
  if rule.startswith("batch"):
    dw = _dw_batch_chunks(x, kernel, stride, padding, g, int(rule[len("batch"):]))
  else:
    dw = (_dw_slices if rule == "slices" else _dw_rows)(x, kernel.shape, stride, padding, g)
  return dx, dw.astype(kernel.dtype)


_conv_custom_dw.defvjp(_fwd, _bwd)


def _dw_batch_chunks(x, kernel, stride, padding, g, chunk):
  # Unrolled on purpose: the same sum as a lax.map / scan loop was 10-30x slower on XLA:CPU.
  dw = None
  for i in range(0, x.shape[0], chunk):
    _, vjp_w = jax.vjp(lambda w: _conv(x[i:i + chunk], w, stride, padding), kernel)
    (d,) = vjp_w(g[i:i + chunk])
    dw = d if dw is None else dw + d
  return dw


def _dw_slices(x, kshape, stride, padding, g):
  kh, kw, cin, cout = kshape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  oh, ow = g.shape[1], g.shape[2]
  g2 = g.reshape(-1, cout)
  taps = [xp[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride]
          .reshape(-1, cin).T @ g2 for i in range(kh) for j in range(kw)]
  return jnp.stack(taps).reshape(kshape)


def _dw_rows(x, kshape, stride, padding, g):
  kh, kw, cin, cout = kshape
  oh, ow = g.shape[1], g.shape[2]
  # (C, N, H, W): a window is then a contiguous (C, M) block and one dot serves a kernel row.
  xt = jnp.pad(x.transpose(3, 0, 1, 2), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  g2 = g.reshape(-1, cout)
  rows = []
  for i in range(kh):
    win = jnp.stack([xt[:, :, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride]
                     for j in range(kw)])
    rows.append((win.reshape(kw * cin, -1) @ g2).reshape(kw, cin, cout))
  return jnp.stack(rows)


# ---- the run-time choice -----------------------------------------------------------------------

def choose(x_shape, k_shape, stride: int, padding: int, dtype) -> str:
  """The rule for this conv: ``$CGN_CONV_DW`` if set; XLA's off the CPU, with several devices or
  for a tiny conv; else the fastest measured on this CPU (cached per shape, CPU and JAX version)."""
  pinned = os.environ.get(ENV_RULE, "auto")
  if pinned != "auto":
    if pinned not in RULES:
      raise ValueError(f"{ENV_RULE}={pinned} is not a rule; use one of {', '.join(RULES)} or auto")
    return "xla" if pinned.startswith("batch") and x_shape[0] % int(pinned[5:]) else pinned
  if jax.default_backend() != "cpu" or not _one_device():
    # Off the CPU XLA's own is the tuned one. With several devices the batch is sharded, and a rule
    # that slices the global batch would serialise the devices; several processes must also all
    # compile the same program.
    return "xla"
  kh, kw, cin, cout = k_shape
  out_pixels = x_shape[0] * (x_shape[1] // stride) * (x_shape[2] // stride)
  if 2 * out_pixels * kh * kw * cin * cout < MIN_MEASURED_FLOP:
    return "xla"  # microseconds either way: not worth compiling the candidates
  key = _key(x_shape, k_shape, stride, padding, dtype)
  with _lock:
    if key not in _choices:
      _choices.update(_read_cache())
    if key not in _choices:
      # Timed in another thread: this runs while the caller's function is being traced, and JAX's
      # trace state is per thread, so the timing calls run eagerly there instead of being staged.
      with concurrent.futures.ThreadPoolExecutor(1) as pool:
        _choices[key] = pool.submit(measure, x_shape, k_shape, stride, padding, dtype).result()
      _write_cache(key, _choices[key])
    return _choices[key]


def measure(x_shape, k_shape, stride: int, padding: int, dtype, rounds: int = 5) -> str:
  """The fastest rule for this conv: XLA's unless another takes less than ``MARGIN`` of its time."""
  best = time_rules(x_shape, k_shape, stride, padding, dtype, rounds)
  fastest = min(best, key=best.get)
  return fastest if best[fastest] < MARGIN * best["xla"] else "xla"


def time_rules(x_shape, k_shape, stride: int, padding: int, dtype, rounds: int = 5
               ) -> dict[str, float]:
  """Seconds for forward + kernel gradient of each rule on random data: the best of ``rounds``
  interleaved calls, wall clock (interference only ever adds time)."""
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape, dtype)
  w = jax.random.normal(kk, k_shape, dtype)
  g = jax.random.normal(kg, _conv(x, w, stride, padding).shape, dtype)
  fns = {}
  for rule in candidates(x_shape[0]):
    def fn(x, w, g, rule=rule):
      y, vjp = jax.vjp(lambda w_: conv(x, w_, stride, padding, rule), w)
      return y, vjp(g)[0]
    fns[rule] = jax.jit(fn)
    jax.block_until_ready(fns[rule](x, w, g))  # compile
  best = {rule: float("inf") for rule in fns}
  for _ in range(rounds):
    for rule, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(x, w, g))
      best[rule] = min(best[rule], time.perf_counter() - t)
  return best


def _one_device() -> bool:
  return jax.device_count() == 1


def candidates(batch: int) -> tuple[str, ...]:
  """The rules worth timing for a batch: chunks smaller than it that divide it."""
  return ("xla", "slices", "rows") + tuple(f"batch{b}" for b in BATCH_CHUNKS
                                           if b < batch and batch % b == 0)


def _key(x_shape, k_shape, stride, padding, dtype) -> str:
  return (f"{cpu_model()}|jax {jax.__version__}|threads {_threads()}|x{tuple(x_shape)}|"
          f"k{tuple(k_shape)}|s{stride}|p{padding}|{jnp.dtype(dtype).name}")


def _threads() -> str:
  flags = os.environ.get("XLA_FLAGS", "")
  return "1" if "intra_op_parallelism_threads=1" in flags else str(len(os.sched_getaffinity(0)))


@functools.lru_cache(None)
def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (figures from one CPU do not carry to another)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform  # pylint: disable=import-outside-toplevel
  return platform.processor() or platform.machine()


def cache_path() -> str:
  return os.environ.get(ENV_CACHE) or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cgn_jax",
      "conv_dw_rules.json")


def _read_cache() -> dict[str, str]:
  try:
    with open(cache_path()) as f:
      data = json.load(f)
    return {k: v for k, v in data.items() if v in RULES}
  except (OSError, ValueError):
    return {}


def _write_cache(key: str, rule: str) -> None:
  """Merges one choice into the cache file (temp name, then rename); a failure only costs a
  re-measurement next time."""
  path = cache_path()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = {**_read_cache(), key: rule}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".conv_dw-")
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError:
    pass
