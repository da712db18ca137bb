"""scripts/gpu_check_imagenet.py in its --tiny CPU mode: the one-JSON device check must run end to
end before anyone spends device time on it."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check_imagenet.py")


def _run(tmp_path, *args, timeout=600):
  out = tmp_path / "check.json"
  # One device, as on the GPU machine (conftest's 4 simulated devices are for the jobs' tests).
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, SCRIPT, "--json", str(out), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


def test_tiny_rows_run_and_write_one_json(tmp_path):
  """Network rows run for real on the tiny networks (in one process, to keep it short; U2-Net and
  the MNIST CGN step go through the same code as BigGAN but compile for minutes here), and the
  ImageNet CGN row traces the job's own train step (its compile alone takes minutes too)."""
  results, stdout = _run(tmp_path, "--tiny", "--in_process", "--steps", "2", "--rows", "biggan",
                         "mnist_generate", "imagenet_cgn", "--lower_only")
  by_row = {r["row"]: r for r in results}
  assert set(by_row) == {"biggan", "mnist_generate", "imagenet_cgn"}
  for row in ("biggan", "mnist_generate"):
    r = by_row[row]
    assert "error" not in r, r
    assert len(r["call_s"]) == 2 and r["images_per_s"] > 0 and r["first_call_s"] > 0
    assert r["device"].startswith("cpu")
  assert by_row["mnist_generate"]["images_per_call"] == 4 * 2  # 4 masks x 2 counterfactuals
  big = by_row["biggan"]
  assert abs(big["tflops"] - 78e9 * big["images_per_s"] / 1e12) < 1e-9
  assert big["fraction_of_bf16_peak"] is None  # a CPU has no entry in the peak table
  assert by_row["imagenet_cgn"]["lower_s"] > 0 and "compile_s" not in by_row["imagenet_cgn"]
  assert "| biggan | float32 |" in stdout and "lowered in" in stdout


def test_rows_past_the_budget_are_skipped_and_said(tmp_path):
  results, stdout = _run(tmp_path, "--tiny", "--budget_s", "0", "--rows", "biggan", "imagenet_cgn",
                         timeout=120)
  assert [r["row"] for r in results] == ["biggan", "imagenet_cgn"]
  assert all(r["error"].startswith("skipped: past the 0 s budget") for r in results)
  assert "skipped" in stdout
