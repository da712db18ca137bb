"""``python tests/fault_injection.py FAULT STEP -- <cgn_jax.main flags>``: the real CLI, with one
real signal sent to itself at a chosen point, so crash tests hit the same instant every time.

FAULT is one of
  kill_after_row   SIGKILL right after the metrics row of STEP is written (between checkpoints:
                   earlier saves are waited for);
  kill_in_save     SIGKILL right after the (asynchronous) save of STEP has started, while its files
                   are being written;
  term_after_row   SIGTERM after the row of STEP (the loop must save and exit non-zero);
  term_in_save     SIGTERM while the save of STEP is being started (a saving process must not
                   ignore it).
"""

from __future__ import annotations

import os
import signal
import sys


def install(fault: str, at: int) -> None:
  from cgn_jax import checkpoints, writers  # pylint: disable=import-outside-toplevel
  sig = signal.SIGKILL if fault.startswith("kill") else signal.SIGTERM
  if fault.endswith("after_row"):
    # "Between checkpoints" means the earlier saves are complete: make them synchronous here, so a
    # slow asynchronous write on a loaded machine cannot still be in flight at the kill.
    original_save = checkpoints.TrainCheckpointer.save

    def save_and_wait(self, step, tree, record):
      original_save(self, step, tree, record)
      self.manager.wait_until_finished()
    checkpoints.TrainCheckpointer.save = save_and_wait
    original = writers.MetricWriter.write_scalars

    def write_scalars(self, step, scalars):
      original(self, step, scalars)
      if step == at:
        os.kill(os.getpid(), sig)
    writers.MetricWriter.write_scalars = write_scalars
  elif fault.endswith("in_save"):
    original_save = checkpoints.TrainCheckpointer.save

    def save(self, step, tree, record):
      if step == at and sig == signal.SIGTERM:
        os.kill(os.getpid(), sig)
      original_save(self, step, tree, record)
      if step == at and sig == signal.SIGKILL:
        os.kill(os.getpid(), sig)
    checkpoints.TrainCheckpointer.save = save
  else:
    raise SystemExit(f"unknown fault {fault}")


def run_main(argv: list[str]) -> None:
  """``python -m cgn_jax.main ARGV`` in this process, after the faults are installed."""
  from absl import app  # pylint: disable=import-outside-toplevel
  from cgn_jax import main  # pylint: disable=import-outside-toplevel
  sys.argv = [sys.argv[0]] + argv
  app.run(main.main, flags_parser=main.parse_flags)


if __name__ == "__main__":
  fault, at, sep, *rest = sys.argv[1:]
  assert sep == "--", sys.argv
  install(fault, int(at))
  run_main(rest)
