"""``benchmarks/gpu_run.py``, the GPU smoke test: its judging on made-up inputs, and its ``--dry-run``
(three tiny float32 engines on this CPU: stock and ``shared`` eager, ``per_stage`` compiled) end to
end, so that the one-command GPU run cannot rot.

The dry run's raw results are then judged again as if they came from a GPU: the checks only a GPU
can pass (FlashAttention 3, full and piecewise CUDA graphs by step, the forced V1 runner) must fail on them.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_run", REPO / "benchmarks" / "gpu_run.py")
gpu_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_run)


def _run(tokens, lps):
    return {"tokens": tokens, "logprobs": [{str(t): lp for t, lp in d.items()} for d in lps]}


def test_agreement_equal_or_near_tie():
    a = _run([5, 6, 7], [{5: -0.1}, {6: -0.5, 9: -0.55}, {7: -0.2}])
    assert gpu_run.agreement(a, a, 0.0) == {"equal": True, "ok": True}
    # parted at position 1, where each run's other choice is 0.05 below its own
    b = _run([5, 9, 3], [{5: -0.1}, {9: -0.5, 6: -0.55}, {3: -0.1}])
    got = gpu_run.agreement(a, b, 0.1)
    assert got == {"equal": False, "at": 1, "gap": 0.05, "ok": True}
    assert not gpu_run.agreement(a, b, 0.01)["ok"]  # float32 (dry run): no such tie allowed
    c = _run([5, 4, 7], [{5: -0.1}, {4: -0.1}, {7: -0.2}])  # the other token not even among the top ones
    assert gpu_run.agreement(a, c, 10.0) == {"equal": False, "at": 1, "gap": None, "ok": False}
    assert not gpu_run.agreement(_run([], []), _run([], []), 0.0)["ok"]  # nothing generated is no agreement
    assert gpu_run.agreement(a, _run([5, 6], [{5: -0.1}, {6: -0.5}]), 0.0) == {"equal": False, "at": 2, "gap": None,
                                                                            "ok": False}


def test_kv_rows_against_the_plan():
    expected = [20, 20, 11, 11]
    rows = {f"model.layers.{i}.self_attn.attn": r + 2 for i, r in enumerate(expected)}  # 2 decode rows
    assert gpu_run.kv_check(rows, expected) == {"ok": True}
    rows["model.layers.3.self_attn.attn"] += 1
    got = gpu_run.kv_check(rows, expected)
    assert not got["ok"] and got["got"] == [20, 20, 11, 12]


def test_expected_kv_rows_follow_the_schedule():
    from vllm_v2drop.config import V2DropConfig

    schedule = V2DropConfig.from_additional_config({"v2drop": {"layers": [1, 3], "keep_ratios": [0.5, 0.0]}}).resolve(
        4, gpu_run.HF_ARCH)
    ids = [1, 2] + [9] * 8 + [3, 4]  # one 8-row image (token 9) in a 12-token prompt
    assert gpu_run.expected_kv_rows(ids, 9, schedule, 4) == [12, 8, 8, 5]
    assert gpu_run.expected_kv_rows(ids, 9, None, 4) == [12] * 4


LOG = """\
(EngineCore pid=1) INFO [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: model='m', \
compilation_config={'mode': <CompilationMode.VLLM_COMPILE: 3>, 'cudagraph_mode': <CUDAGraphMode.FULL_AND_PIECEWISE: 2>}
(EngineCore pid=1) INFO [cuda.py:507] Using FLASH_ATTN attention backend out of potential backends: ['FLASH_ATTN'].
(EngineCore pid=1) INFO [flash_attn.py:1118] Using FlashAttention version 3
(APIServer pid=0) INFO [registry.py:196] V2Drop forces: multimodal items never split (disable_chunked_mm_input); \
the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)
(EngineCore pid=1) INFO [runner.py:240] V2Drop: the first step without per-stage attention metadata ran with CUDA graph mode FULL
(EngineCore pid=1) INFO [runner.py:240] V2Drop: the first step with per-stage attention metadata ran with CUDA graph mode PIECEWISE
(EngineCore pid=1) INFO [runner.py:240] V2Drop: the first step without per-stage attention metadata ran with CUDA graph mode PIECEWISE
(EngineCore pid=1) /x/vllm_v2drop/worker/runtime.py:88: UserWarning: called a synchronizing CUDA operation (Triggered)
(EngineCore pid=1) /x/vllm_v2drop/worker/runtime.py:88: UserWarning: called a synchronizing CUDA operation (Triggered)
(EngineCore pid=1) /x/vllm/sampler.py:12: UserWarning: Tensor.to: a non_blocking H2D copy that may be silently \
synchronous (the CPU tensor is not pinned). Implicit GPU<->CPU sync detected - use a pinned tensor
"""


def test_read_log():
    got = gpu_run.read_log(LOG)
    assert got["attention_backend"] == "FLASH_ATTN" and got["flash_attn_version"] == 3
    assert got["cudagraph_mode"] == "FULL_AND_PIECEWISE" and not got["v2_runner_line"] and got["tracebacks"] == 0
    assert "V1 model runner" in got["v2drop_forces"]
    assert got["graph_modes"] == {"with": ["PIECEWISE"], "without": ["FULL", "PIECEWISE"]}
    assert got["sync_warnings"] == 3
    assert got["sync_sites"] == {"/x/vllm_v2drop/worker/runtime.py:88": 2, "/x/vllm/sampler.py:12": 1}
    none = gpu_run.read_log("Using V2 Model Runner\nTraceback (most recent call last):\n")
    assert none["v2_runner_line"] and none["tracebacks"] == 1 and none["v2drop_forces"] is None
    assert none["graph_modes"] == {"with": [], "without": []}


# ------------------------------------------------------------------------------------ the dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-run")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_run.py"), "--dry-run", "--out", str(out),
                           "--logs", str(out / "logs")], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    return out, json.loads((out / "gpu-smoke-cpu-dry.json").read_text())


def _raw(out: Path, report: dict):
    names = list(report["engines"])
    results = {n: json.loads((out / "logs" / f"{n}.json").read_text()) for n in names}
    logs = {n: gpu_run.read_log((out / "logs" / f"{n}.log").read_text()) for n in names}
    return {"engines": [report["engines"][n] for n in names]}, results, logs


@pytest.mark.slow
def test_dry_run_passes_every_check(dry_run):
    out, report = dry_run
    assert report["passed"] and report["dry_run"] and report["scenario_sizes"] == [1, 3, 5]
    engines = report["engines"]
    assert list(engines) == ["stock-eager", "shared-eager", "per_stage"]
    assert engines["per_stage"]["facts"]["compilation_mode"] != "NONE"  # vLLM's default compilation
    assert engines["per_stage"]["facts"]["max_capture_size"] == 4  # the last scenario is one more
    assert engines["shared-eager"]["facts"]["compilation_mode"] == "NONE"
    checks = {(c["engine"], c["check"]): c for c in report["checks"]}
    assert all(c["ok"] for c in checks.values())
    for engine in ("shared-eager", "per_stage"):
        for check in ("V1 model runner", "V2Drop forced-settings line", "v2drop_off equals stock",
                      "CUDA graphs by step: none"):
            assert (engine, check) in checks
        for n in (1, 3, 5):
            batched = checks[(engine, f"batched equals alone ({n} image requests + decodes)")]
            assert batched["requests"] == n + 2 and batched["equal"] == n + 2  # float32: equal tokens
            assert checks[(engine, f"KV rows per layer equal the plan ({n} image requests + decodes)")]["requests"] == n
    assert checks[("per_stage", "compiled equals eager (shared-eager)")]["equal"] == 7
    assert ("shared-eager", "layer-1 schedule in eager mode (drop at layer 1, KV rows as planned)") in checks
    m = report["measurements"]
    assert all(m[e]["drop_step_prefill_s"] > 0 and m[e]["decode_itl_ms"] > 0 for e in engines)
    assert m["stock-eager"]["decode_itl_vs_stock"] == 1.0 and m["per_stage"]["peak_gib_after_drop_step"] is None


@pytest.mark.slow
def test_dry_run_results_fail_where_they_should(dry_run):
    """Judged as a GPU run, the CPU's results fail the GPU-only checks; a changed token or KV row fails."""
    out, report = dry_run
    run, results, logs = _raw(out, report)
    shape, model = gpu_run.SHAPES["dry"], report["model"]
    as_gpu = {**shape, "dtype": "bfloat16"}
    failed = {(c["engine"], c["check"]) for c in gpu_run.judge(run, results, logs, as_gpu, model, cuda=True)
              if not c["ok"]}
    assert {("stock-eager", "FLASH_ATTN, FlashAttention 3"), ("per_stage", "CUDA graph mode FULL_AND_PIECEWISE"),
            ("per_stage", "CUDA graphs by step: planned piecewise, unplanned full"),
            ("per_stage", "V2Drop forced-settings line")} <= failed
    assert not any(c.startswith(("batched", "KV rows")) for _, c in failed)

    bad = copy.deepcopy(results)
    scenario = bad["per_stage"]["scenarios"]["3"]
    scenario["outputs"]["img1"]["tokens"][-1] += 1
    scenario["kv_rows"]["img2"] = {k: v + 1 if ".layers.7." in k else v for k, v in scenario["kv_rows"]["img2"].items()}
    failed = {c["check"]: c for c in gpu_run.judge(run, bad, logs, shape, model, cuda=False)
              if not c["ok"] and c["engine"] == "per_stage"}
    assert set(failed) == {"batched equals alone (3 image requests + decodes)",
                           "KV rows per layer equal the plan (3 image requests + decodes)"}
    assert list(failed["batched equals alone (3 image requests + decodes)"]["differ"]) == ["img1"]
    assert list(failed["KV rows per layer equal the plan (3 image requests + decodes)"]["wrong"]) == ["img2"]
