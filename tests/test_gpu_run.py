"""``benchmarks/gpu_run.py --dry-run``: the one-command GPU run, at tiny shapes on this CPU, so it cannot rot.

It collects the GPU/engine checks, runs the host-overhead benchmark (one count) and the decode-heavy
serving benchmark (one request, ``kv_mode: per_stage``; ``shared`` is the same command with one config
value, run end to end by ``test_benchmark.py``) with the tiny model, and writes their results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_gpu_run_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_run.py"), "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "tests collected" in proc.stdout  # every selected GPU/engine check exists
    host = json.loads((tmp_path / "cpu-host-overhead-llava-onevision.json").read_text())
    row = host["rows"][0]
    assert [r["mode"] for r in host["rows"]] == ["shared"] and row["v2drop_worker_ms"] > 0
    # the backend's own work in V2Drop's metadata (slot op, metadata build) is timed apart, and is part of it
    assert 0 < row["v2drop_backend_ms"] < row["v2drop_worker_ms"]
    assert row["v2drop_worker_own_ms"] == pytest.approx(row["v2drop_worker_ms"] - row["v2drop_backend_ms"])
    report = json.loads((tmp_path / "cpu-dry-decode-llava-onevision-per_stage.json").read_text())
    assert report["results"][0]["ratio_v2drop_over_stock"]["output_tok_s"] > 0
    assert not (tmp_path / "cpu-dry-decode-llava-onevision-shared.json").exists()
