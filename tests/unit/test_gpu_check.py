"""bench/gpu/check.py, the GPU check of issue 20: its CPU smoke runs the very path the GPU run takes
(the random-weight model, ftpipe's and TRL's trainers in their own processes, the planner, the
report), so that a GPU machine's few minutes are not lost to a broken driver; and the lookups that
only matter on a GPU."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu.check import peak_tflops, planner_device, throughput

ROOT = Path(__file__).resolve().parents[2]


def test_peak_flops_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0           # not the SXM part's figure
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.0                # not L4's
    assert peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("Tesla T4") is None                    # unknown: no MFU rather than a wrong one


def test_planner_device_by_device_name():
    gib = 2**30
    assert planner_device("NVIDIA H100 80GB HBM3", 80 * gib).kind == "h100"
    assert planner_device("NVIDIA A100-SXM4-80GB", 80 * gib).kind == "a100-80gb"
    assert planner_device("NVIDIA A100-SXM4-40GB", 40 * gib).kind == "a100"
    other = planner_device("NVIDIA H200", 140 * gib)          # not in GPU_TABLE: its own capacity
    assert (other.kind, other.capacity_bytes, other.gpu) == ("NVIDIA H200", 140 * gib, True)


def test_throughput_leaves_the_warm_up_out():
    measured = {"step_ends": [10.0, 11.0, 11.5, 12.0, 12.5], "steps": 5, "tokens": 5000}
    assert throughput(measured, warmup=2) == (3000, 1.5)


@pytest.mark.slow
def test_cpu_smoke_runs_both_sides(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "bench/gpu/check.py", "--cpu-smoke", "--work", str(tmp_path),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    sides = {(r["side"], r["kind"]): r for r in result["sides"]}
    kinds = ("lora", "qlora") if importlib.util.find_spec("bitsandbytes") else ("lora",)
    for kind in kinds:
        for side in ("ftpipe", "trl"):
            row = sides[side, kind]
            assert row["tokens_per_s"] > 0 and row["peak_bytes"] > 0, row
            assert row["timed_tokens"] == 2 * 2 * 128   # the steps after the warm-up, every row full
            assert row["compute"]["precision"] == "bf16" and row["compute"]["gradient_checkpointing"], row
        assert sides["ftpipe", kind]["planner"]["predicted_bytes"] > 0
        assert kind in result["ftpipe_vs_trl"]
    assert "ftpipe  lora" in proc.stdout    # the side-by-side table
