"""Where V2Drop touches vLLM: the table matches the installed vLLM, and a signature that differs
stops V2Drop at start-up, naming the seam, the qualified name, the expected and found signatures
and the supported vLLM versions, while a stock engine configures as usual.

A differing vLLM is faked by replacing one target (``monkeypatch``) and clearing the per-process
cache of results; the start-up path is vLLM's own ``EngineArgs.create_engine_config``, what
``vllm serve`` and ``LLM(...)`` run before any engine starts. No engine starts here.
"""

from __future__ import annotations

import time

import pytest
from conftest import engine_config

from vllm_v2drop import seams
from vllm_v2drop.seams import _check
from vllm_v2drop.seams import SEAMS, V2DropSeamError, check_seams, find_mismatches
from vllm_v2drop.version import SUPPORTED_VLLM

ALL = [s.name for s in SEAMS]
FREE = "vllm.v1.core.kv_cache_manager.KVCacheManager.free"


@pytest.fixture(autouse=True)
def fresh_results(monkeypatch):
    """Every test checks the running vLLM anew, and leaves the cache as it found it."""
    monkeypatch.setattr(seams, "_results", {})


def fake_free(self, request_id, reason=None):  # vLLM's is (self, request)
    raise AssertionError("never called")


def assert_names_the_difference(text: str) -> None:
    assert "seam 'scheduler'" in text, text
    assert FREE in text, text
    assert "expected (self, request), found (self, request_id, reason=None)" in text, text
    assert f"supports vLLM {' or '.join(SUPPORTED_VLLM)}" in text, text


# ------------------------------------------------------------------------------------- the table


def test_the_table_matches_the_installed_vllm():
    assert find_mismatches(ALL) == []
    check_seams(ALL)
    check_seams()


def test_the_table_is_grouped_by_seam_and_names_each_target_once():
    names = [t.target for s in SEAMS for t in s.touches]
    assert len(names) == len(set(names))
    assert {"scheduler", "KV-cache coordinator", "model runner", "frontend and input processing",
            "model registry and config hook"} <= set(ALL)
    for s in SEAMS:
        for t in s.touches:
            assert t.how in (seams.EXACT, seams.CALLS, seams.NAMES), t
            assert t.params is None or t.params.startswith("("), t
            if t.params is not None:
                _check._parse(t.params)  # valid parameter lists


def test_the_check_is_fast():
    check_seams(ALL)  # imports what it checks (vLLM's model runner among them)
    seams._results.clear()
    start = time.perf_counter()
    check_seams(ALL)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        check_seams()
    again = (time.perf_counter() - start) / 100
    assert first < 0.05, f"checking every seam took {first * 1e3:.1f} ms"
    assert again < 1e-3, f"a cached check took {again * 1e3:.3f} ms"


# ------------------------------------------------------------------------ what a difference says


def test_a_faked_signature_is_named_with_expected_and_found(monkeypatch):
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    monkeypatch.setattr(KVCacheManager, "free", fake_free)
    (m,) = find_mismatches(["scheduler"])
    assert (m.seam, m.name) == ("scheduler", FREE)
    assert (m.expected, m.found) == ("(self, request)", "(self, request_id, reason=None)")
    with pytest.raises(V2DropSeamError) as err:
        check_seams()
    assert isinstance(err.value, ValueError)
    assert_names_the_difference(str(err.value))
    assert "--model-impl v2drop" in str(err.value)


def test_every_difference_is_listed_once_and_the_result_is_cached(monkeypatch):
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    monkeypatch.setattr(KVCacheManager, "free", fake_free)
    monkeypatch.setattr(KVCacheCoordinator, "cache_blocks", lambda self, request: None)
    found = {(m.seam, m.name) for m in find_mismatches(ALL)}
    assert found == {("scheduler", FREE),
                     ("KV-cache coordinator", "vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.cache_blocks")}
    cached = seams._results
    monkeypatch.undo()  # vLLM as it is again: the process keeps its first answer
    monkeypatch.setattr(seams, "_results", cached)
    assert len(find_mismatches(ALL)) == 2


def test_a_missing_attribute_or_module_is_a_difference(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.delattr(Scheduler, "_try_schedule_encoder_inputs")
    monkeypatch.setattr(seams, "all_seams", lambda: SEAMS + (seams.Seam("test", "a renamed module", (
        seams.Touch("vllm.v1.no_such_module:Thing.method", "(self)", seams.EXACT, "nowhere"),)),))
    found = {m.name: m for m in find_mismatches(["scheduler", "test"])}
    gone = found["vllm.v1.core.sched.scheduler.Scheduler._try_schedule_encoder_inputs"]
    assert gone.found.startswith("missing (no attribute '_try_schedule_encoder_inputs' on Scheduler")
    assert gone.expected.startswith("(self, request, num_computed_tokens")
    assert found["vllm.v1.no_such_module.Thing.method"].found.startswith("missing (cannot import vllm.v1.no_such_module")


def test_a_subclass_overriding_a_wrapped_method_is_a_difference(monkeypatch):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    def own(self, request, num_computed_tokens, num_new_tokens, encoder_compute_budget, shift_computed_tokens=0):
        raise AssertionError("never called")

    monkeypatch.setattr(AsyncScheduler, "_try_schedule_encoder_inputs", own)  # restored: inherited again
    (m,) = find_mismatches(["scheduler"])
    assert m.found == "overridden in vllm.v1.core.sched.async_scheduler.AsyncScheduler"


@pytest.mark.parametrize("declared, found, how, ok", [
    ("(self, request)", "(self, request)", "exact", True),
    ("(self, request)", "(self, request, extra=None)", "exact", False),
    ("(self, a, b=0)", "(self, a, b=1)", "exact", False),
    ("(self, a, *, k)", "(self, a, k=None, *, other=0)", "calls", True),
    ("(self, a, *, k)", "(self, a, *, k=None, other)", "calls", False),  # a new required parameter
    ("(self, a)", "(self, b)", "calls", False),
    ("(*, k)", "(k, j=1)", "calls", True),
    ("(spec, cls, **changes)", "(spec, cls, *, drop=(), **changes)", "calls", True),
    ("(spec, cls, **changes)", "(spec, cls)", "calls", False),
    ("(self, request)", "(self, request, prompt, queue=None)", "names", True),
    ("(self, request)", "(self, req, prompt)", "names", False),
    ("(*, block_table)", "(num, block_table, slots)", "names", True),
    ("(*, block_table)", "(num, slots)", "names", False),
])
def test_how_a_touch_relies_on_its_target(declared, found, how, ok):
    assert _check._matches(_check._parse(declared), _check._parse(found), how) is ok


# --------------------------------------------------------------- start-up, vLLM's real config path


def test_v2drop_on_a_differing_vllm_stops_at_startup(tiny_models, monkeypatch):
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    model = tiny_models["qwen2-vl"]
    monkeypatch.setattr(KVCacheManager, "free", fake_free)
    for kw in ({"model_impl": "v2drop"}, {"hf_overrides": {"architectures": ["V2DropQwen2VLForConditionalGeneration"]}}):
        with pytest.raises(Exception) as err:  # vLLM wraps hook errors in pydantic's ValidationError
            engine_config(model, **kw)
        assert_names_the_difference(str(err.value))
    # Without V2Drop the same vLLM configures as usual, and nothing of V2Drop checked it.
    seams._results.clear()
    assert engine_config(model).model_config.architecture == "Qwen2VLForConditionalGeneration"
    assert seams._results == {}


def test_v2drop_on_the_supported_vllm_configures(tiny_models):
    config = engine_config(tiny_models["qwen2-vl"], model_impl="v2drop")
    assert config.model_config.architecture == "V2DropQwen2VLForConditionalGeneration"
    assert "scheduler" in seams._results and not any(seams._results.values())
