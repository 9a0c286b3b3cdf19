"""Per-request V2Drop settings and the frontend's counters, without an engine (fast).

The real server runs the same code in ``test_request_serving.py``.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_v2drop.config import V2DropConfig, V2DropConfigError
from vllm_v2drop.frontend import FrontendStats
from vllm_v2drop.overrides import V2DropRequestError, parse
from vllm_v2drop.core.counts import keep_counts, solve_keep_ratios
from vllm_v2drop.core.request_plan import plan_request
from vllm_v2drop.worker.runtime import RequestView, VisionItem, plan_for, request_view


def schedule(**cfg):
    return V2DropConfig(**cfg).resolve(8, "Qwen2VLForConditionalGeneration")  # layers (1, 5, 6)


SCHED = schedule()


def test_request_settings_work_without_vllm():
    """The settings' reader and its error import and work where vLLM is not installed."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['vllm'] = None; sys.modules['vllm.exceptions'] = None\n"
        "from vllm_v2drop.config import V2DropConfig\n"
        "from vllm_v2drop.overrides import V2DropRequestError, parse\n"
        "sched = V2DropConfig().resolve(8, 'Qwen2VLForConditionalGeneration')\n"
        "try:\n"
        "    parse({'v2drop_off': 3}, sched)\n"
        "except ValueError as err:\n"
        "    assert isinstance(err, V2DropRequestError) and 'vllm_xargs.v2drop_off' in str(err), err\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_settings_means_the_engine_schedule():
    assert parse(None, SCHED) is None
    assert parse({}, SCHED) is None
    assert parse({"kv_transfer_params": {"x": 1}, "other_ext": 3}, SCHED) is None  # other extensions' keys


def test_good_settings():
    assert parse({"v2drop_off": True}, SCHED).off
    assert parse({"v2drop_off": 1}, SCHED).off  # vllm_xargs turns JSON true into 1
    assert not parse({"v2drop_off": 0}, SCHED).off
    assert parse({"v2drop_keep_ratios": [1, 0.5, 0.0]}, SCHED).keep_ratios == (1.0, 0.5, 0.0)
    o = parse({"v2drop_target_retention": 0.3}, SCHED)
    assert o.keep_ratios == solve_keep_ratios(SCHED.layers, 8, 0.3, 576, 1).keep_ratios
    assert parse({"v2drop_off": True, "v2drop_target_retention": 0.3}, SCHED).keep_ratios is None


@pytest.mark.parametrize("extra,key,text", [
    ({"v2drop_bogus": 1}, "v2drop_bogus", "unknown key (allowed keys: v2drop_off, v2drop_target_retention"),
    ({"v2drop_off": "yes"}, "v2drop_off", "got 'yes' (allowed: true or false"),
    ({"v2drop_off": 2}, "v2drop_off", "got 2"),
    ({"v2drop_target_retention": 0}, "v2drop_target_retention", "got 0 (allowed: a number in (0, 1])"),
    ({"v2drop_target_retention": 1.5}, "v2drop_target_retention", "got 1.5"),
    ({"v2drop_target_retention": "0.3"}, "v2drop_target_retention", "got '0.3'"),
    ({"v2drop_keep_ratios": [1, 1.2, 0]}, "v2drop_keep_ratios", "ratio 1.2 is outside [0, 1]"),
    ({"v2drop_keep_ratios": [1, -0.1, 0]}, "v2drop_keep_ratios", "ratio -0.1 is outside [0, 1]"),
    ({"v2drop_keep_ratios": [0.5, 0.5]}, "v2drop_keep_ratios", "got 2 ratio(s), but this engine drops at 3 layer(s) [1, 5, 6]"),
    ({"v2drop_keep_ratios": 0.5}, "v2drop_keep_ratios", "got 0.5 (allowed: a list of numbers in [0, 1]"),
    ({"v2drop_keep_ratios": ["a", 1, 1]}, "v2drop_keep_ratios", "got ['a', 1, 1]"),
    ({"v2drop_keep_ratios": [1, 1, 1], "v2drop_target_retention": 0.5}, "v2drop_keep_ratios",
     "give v2drop_keep_ratios or v2drop_target_retention, not both"),
])
def test_bad_settings_name_the_key_and_what_it_allows(extra, key, text):
    with pytest.raises(ValueError) as info:
        parse(extra, SCHED)
    err = info.value
    assert isinstance(err, V2DropRequestError) and err.key == key
    assert f"vllm_xargs.{key}" in str(err) and text in str(err), str(err)
    from vllm.exceptions import VLLMValidationError

    assert isinstance(err, VLLMValidationError) and err.parameter == f"vllm_xargs.{key}"  # -> HTTP 400


def test_pinned_engine_refuses_request_settings():
    pinned = schedule(allow_request_overrides=False)
    assert parse({"other": 1}, pinned) is None
    with pytest.raises(V2DropRequestError, match="allow_request_overrides: false"):
        parse({"v2drop_off": True}, pinned)
    with pytest.raises(V2DropConfigError, match="allow_request_overrides"):
        V2DropConfig(allow_request_overrides="no")


def _view(extra=None, prompt_logprobs=None, n=120, item=(10, 58)):
    return RequestView("r", n, [VisionItem("image", np.arange(*item))], prompt_logprobs is not None, extra)


def test_plan_for_uses_the_request_settings():
    rows = 48
    assert plan_for(SCHED, _view()).counts[0].tolist() == [rows, *keep_counts(rows, SCHED.keep_ratios)]
    assert plan_for(SCHED, _view({"v2drop_off": 1})).counts[0].tolist() == [rows] * 4
    assert not plan_for(SCHED, _view({"v2drop_off": 1})).pruned
    ratios = solve_keep_ratios(SCHED.layers, 8, 0.6, 576, 1).keep_ratios
    assert plan_for(SCHED, _view({"v2drop_target_retention": 0.6})).counts[0].tolist() == [rows, *keep_counts(rows, ratios)]
    assert plan_for(SCHED, _view({"v2drop_keep_ratios": [1, 0.5, 0]})).counts[0].tolist() == [48, 48, 24, 1]
    # prompt logprobs still win; a bad value that got past the frontend falls back to the schedule
    assert not plan_for(SCHED, _view({"v2drop_keep_ratios": [1, 0.5, 0]}, prompt_logprobs=1)).pruned
    assert plan_for(SCHED, _view({"v2drop_keep_ratios": [2]})).counts[0].tolist() == plan_for(SCHED, _view()).counts[0].tolist()


def test_request_view_reads_extra_args_like_scheduler_and_worker():
    feat = SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=10, length=48, is_embed=None))
    params = SimpleNamespace(prompt_logprobs=None, extra_args={"v2drop_target_retention": 0.3})
    view = request_view("r", 120, [feat], params)
    assert view.extra_args == {"v2drop_target_retention": 0.3}
    assert plan_for(SCHED, view).counts.tolist() == plan_for(SCHED, _view({"v2drop_target_retention": 0.3})).counts.tolist()


# ------------------------------------------------------------------------------ frontend stats
def _request(rid, extra=None, n=120, item=(10, 48), prompt_logprobs=None):
    feat = SimpleNamespace(modality="image", mm_position=SimpleNamespace(offset=item[0], length=item[1], is_embed=None))
    return SimpleNamespace(request_id=rid, prompt_token_ids=list(range(n)), prompt_embeds=None, mm_features=[feat],
                           sampling_params=SimpleNamespace(prompt_logprobs=prompt_logprobs, extra_args=extra))


def _out(rid, k=1, finished=False):
    return SimpleNamespace(request_id=rid, new_token_ids=[0] * k, finish_reason="length" if finished else None)


@pytest.mark.parametrize("kv_mode", ["shared", "per_stage"])
def test_frontend_counts_equal_plan_sums(kv_mode):
    sched = schedule(kv_mode=kv_mode)
    stats = FrontendStats(sched, block_size=16)
    reqs = {"a": None, "b": {"v2drop_target_retention": 0.6}, "c": {"v2drop_keep_ratios": [1, 0.5, 0]},
            "d": {"v2drop_off": True}}
    for rid, extra in reqs.items():
        stats.on_add(_request(rid, extra))
    stats.on_add(_request("e", prompt_logprobs=1))
    stats.on_add(_request("f"))  # aborted before its prefill: never counted
    assert stats.totals["requests_pruned"] == 0  # nothing counts before the first token
    stats.on_outputs([_out(r) for r in "abcde"])
    stats.on_abort(["f"])
    stats.on_outputs([_out(r, 9, finished=True) for r in "abcde"])  # 10 tokens each

    plans = {r: plan_for(sched, request_view(r, 120, _request(r, e).mm_features, _request(r, e).sampling_params))
             for r, e in reqs.items() if r != "d"}
    t = stats.totals
    assert t["requests_pruned"] == 3
    assert t["requests_unpruned"] == {"request_off": 1, "prompt_logprobs": 1, "schedule": 0}
    assert t["vision_rows_received"] == 3 * 48
    assert t["vision_rows_present"] == np.sum([p.counts.sum(axis=0) for p in plans.values()], axis=0).tolist()
    assert t["kv_rows_not_written"] == sum(p.kv_rows_saved(sched.layers, 8) for p in plans.values())
    if kv_mode == "per_stage":
        # groups of the 1/4/1/2-layer stages: vLLM makes 8 one-layer groups (stages 0,1,1,1,1,2,3,3)
        stages = [0, 1, 1, 1, 1, 2, 3, 3]
        n = 120 + 10 - 1
        want = sum(math.ceil(n / 16) - math.ceil(p.compact_len(s, n) / 16) for p in plans.values() for s in stages)
        assert want > 0 and t["kv_blocks_not_allocated"] == want
    else:
        assert t["kv_blocks_not_allocated"] == 0
    assert not stats.live


def test_prometheus_metrics_are_registered_with_vllm_names():
    from prometheus_client import REGISTRY, generate_latest

    stats = FrontendStats(schedule(kv_mode="per_stage"), block_size=16, model_name="m", prometheus=True)
    stats.on_add(_request("a"))
    stats.on_outputs([_out("a")])
    stats.on_outputs([_out("a", finished=True)])
    text = generate_latest(REGISTRY).decode()
    assert 'vllm:v2drop_requests_pruned_total{model_name="m"} 1.0' in text
    assert 'vllm:v2drop_vision_rows_received_total{model_name="m"} 48.0' in text
    assert 'vllm:v2drop_vision_rows_present_total{model_name="m",stage="3"} 1.0' in text
    assert "vllm:v2drop_kv_rows_not_written_total" in text and "vllm:v2drop_kv_blocks_not_allocated_total" in text
    assert 'vllm:v2drop_request_retention_count{model_name="m"} 1.0' in text
    FrontendStats(schedule(), block_size=16, model_name="m", prometheus=True)  # a second engine replaces the first
    assert 'vllm:v2drop_requests_pruned_total{model_name="m"} 0.0' in generate_latest(REGISTRY).decode()


# ------------------------------------------------------------------------------ show-trace
def test_show_trace_draws_each_stage(tmp_path):
    from PIL import Image

    from vllm_v2drop.cli import main
    from vllm_v2drop.show_trace import infer_grid

    assert infer_grid(48, 224 / 168) == (1, 6, 8)
    assert infer_grid(4 * 16, 1.0, frames=8) == (4, 4, 4)
    assert infer_grid(2 * 16 * 12 * 12 // 2, 1.0, frames=32) == (16, 12, 12)  # Qwen: 2 frames a patch
    # LLaVA-OneVision: 16 frames of 4 x 4 pooled patches and one newline row (not a 1 x 257 strip)
    assert infer_grid(16 * 16 + 1, 1.0, frames=16) == (16, 4, 4)
    rec = {"request_id": "chatcmpl-abc-1", "layers": [1, 5, 6], "items": [
        {"modality": "image", "first": 5, "rows": 48, "kept": [list(range(5, 53, 2)), [5, 9, 20], [20]]},
        {"modality": "video", "first": 60, "rows": 64, "kept": [list(range(60, 124, 4)), [61, 100], [100]]}]}
    (tmp_path / "t.jsonl").write_text(json.dumps(rec) + "\n")
    Image.new("RGB", (224, 168), (200, 30, 30)).save(tmp_path / "i.png")
    np.save(tmp_path / "v.npy", np.zeros((8, 64, 64, 3), np.uint8))
    out = tmp_path / "o.png"
    assert main(["show-trace", str(tmp_path / "t.jsonl"), "--request", "abc", "--image", str(tmp_path / "i.png"),
                 "--video", str(tmp_path / "v.npy"), "--out", str(out), "--cell", "8"]) == 0
    img = Image.open(out)
    assert img.width > 4 * 8 * 8 and img.height > 2 * 6 * 8
