"""bench/gpu_check.py on tiny shapes on the CPU: every check and measurement runs, so the GPU script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # tiny shapes: threads only wait on each other
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=900, check=False)


def test_every_part_runs_on_tiny_cpu_shapes(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = _run("--device", "cpu", "--tiny", "--budget", "800", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["checks"]) == {"forward_vs_peft", "nf4_bytes_vs_bnb", "qlora_gradients", "merge_exact",
                                     "routed_vs_per_adapter"}
    assert all(check["ok"] for check in result["checks"].values())
    assert result["checks"]["forward_vs_peft"]["adapter_effect"] > 1e-2  # the check compares real adapters
    for name, section in result["measurements"].items():
        assert "error" not in section and "skipped" not in section and "stopped" not in section, (name, section)
        assert section["rows"] and all(row.get("ms", row.get("lorakit_ms", 0)) > 0 for row in section["rows"])
    assert set(result["measurements"]) == {"lora_step", "qlora_step", "dequantize", "decode"}
    assert "Checks" in proc.stdout and "qlora_x_peft_bnb" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_without_cuda_it_says_how_to_run_on_cpu():
    proc = _run()
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--device cpu --tiny" in proc.stderr
