"""Launching real multi-process runs on 127.0.0.1, as the README says a cluster is launched.

Each process is ``python -m cgn_jax.main`` with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
and ``JAX_PROCESS_ID`` set, its own simulated CPU devices and JAX's CPU collectives (Gloo). All
processes run in one process group per child, so a failure or a timeout kills every one of them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(args: list[str], num_processes: int = 2, devices_per_process: int = 2,
           timeout: float = 900, log_dir: str | None = None,
           module: str | None = "cgn_jax.main") -> list[str]:
  """Runs ``python -m MODULE ARGS`` (``python ARGS`` without a module) as ``num_processes``
  processes; returns their outputs.

  Raises AssertionError (with the tail of every output) when one fails or the time runs out; the
  children are killed either way.
  """
  port = free_port()
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES=str(num_processes), JAX_PLATFORMS="cpu",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  log_dir = log_dir or os.getcwd()
  logs = [os.path.join(log_dir, f"process_{i}.log") for i in range(num_processes)]
  procs = []
  try:
    for i in range(num_processes):
      with open(logs[i], "w") as out:
        procs.append(subprocess.Popen(
            [sys.executable, *(["-m", module] if module else []), *args], cwd=ROOT,
            env=dict(env, JAX_PROCESS_ID=str(i)), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True))
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):  # one failed: the rest would wait forever
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  outputs = [open(log).read() for log in logs]
  codes = [p.returncode for p in procs]
  if codes != [0] * num_processes:
    tails = "\n".join(f"--- process {i} (exit {c}) ---\n{o[-2500:]}"
                      for i, (c, o) in enumerate(zip(codes, outputs)))
    raise AssertionError(f"multi-process run failed or timed out after {timeout} s:\n{tails}")
  return outputs
