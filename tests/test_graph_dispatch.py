"""CUDA graphs by step: a step V2Drop plans (per-stage attention metadata) never takes a full CUDA
graph; a step it plans nothing in keeps vLLM's full graph.

CUDA graphs do not exist on this CPU, so vLLM's own pieces are driven directly, as on a GPU:
vLLM's ``CudagraphDispatcher`` with FULL_AND_PIECEWISE keys (vLLM 0.32's default on a GPU), and
vLLM's ``GPUModelRunner._determine_batch_execution_and_padding`` as the runner seam wraps it, on a
runner object holding only what that method reads. The step's batch and plan are stand-ins
(``read_batch`` and the runtime's ``plan_step``); what a plan is, is tested elsewhere. The GPU
smoke test (``benchmarks/gpu_run.py``) checks the same on a real engine from its log lines.
"""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
from vllm.config import CompilationMode, CUDAGraphMode, VllmConfig
from vllm.forward_context import set_forward_context
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_v2drop.seams import runner as seam

CAPTURE = [1, 2, 4, 8]


def gpu_like_config() -> VllmConfig:
    config = VllmConfig()
    cc = config.compilation_config
    cc.mode, cc.cudagraph_mode = CompilationMode.VLLM_COMPILE, CUDAGraphMode.FULL_AND_PIECEWISE
    cc.cudagraph_capture_sizes, cc.max_cudagraph_capture_size = CAPTURE, max(CAPTURE)
    cc.splitting_ops = list(cc._attention_ops)  # piecewise graphs split at attention, as on a GPU
    return config


class Runtime:
    def __init__(self, plan):
        self.plan, self.planned = plan, []

    def plan_step(self, batch):
        self.planned.append(batch)
        return self.plan


def make_runner(plan) -> GPUModelRunner:
    """A ``GPUModelRunner`` with what ``_determine_batch_execution_and_padding`` reads (no model, no device)."""
    config = gpu_like_config()
    runner = object.__new__(GPUModelRunner)
    dispatcher = CudagraphDispatcher(config)
    dispatcher.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 1)
    runtime = Runtime(plan)
    runner.__dict__.update(
        vllm_config=config, model_config=types.SimpleNamespace(is_encoder_decoder=False),
        parallel_config=config.parallel_config, cudagraph_dispatcher=dispatcher, uniform_decode_query_len=1,
        input_batch=types.SimpleNamespace(lora_id_to_lora_request={}), speculative_config=None,
        get_model=lambda: types.SimpleNamespace(v2drop_runtime=runtime), _runtime=runtime)
    return runner


@pytest.fixture(autouse=True)
def installed(monkeypatch):
    seam.install()
    monkeypatch.setattr(seam, "read_batch", lambda runner: "the step's batch")


def decide(runner, num_reqs: int, tokens_each: int = 1, prepared: bool = True):
    """vLLM's decision for a step of ``num_reqs`` requests, after vLLM prepared its inputs (or not: a dummy run)."""
    if prepared:
        runner._v2drop_planned = seam._PREPARED  # what the wrapped _prepare_inputs leaves
    scheduled = np.full(num_reqs, tokens_each, dtype=np.int32)
    mode, desc, *_ = runner._determine_batch_execution_and_padding(
        num_tokens=int(scheduled.sum()), num_reqs=num_reqs, num_scheduled_tokens_np=scheduled,
        max_num_scheduled_tokens=tokens_each)
    return mode, desc


def test_a_decode_step_without_a_plan_takes_vllms_full_graph():
    runner = make_runner(plan=None)
    mode, desc = decide(runner, 3)
    assert mode == CUDAGraphMode.FULL and desc.num_tokens == 4 and desc.uniform
    assert runner._runtime.planned == ["the step's batch"]  # planned once, before the dispatch
    assert runner._v2drop_planned == ("the step's batch", None)  # what the forward then runs with


def test_a_planned_step_takes_a_piecewise_graph_or_none():
    plan = object()
    runner = make_runner(plan)
    mode, desc = decide(runner, 3)
    assert mode == CUDAGraphMode.PIECEWISE and desc.num_tokens == 4 and not desc.uniform
    assert runner._v2drop_planned == ("the step's batch", plan)
    mode, _ = decide(runner, 20)  # beyond the largest capture size: eager, as vLLM runs it
    assert mode == CUDAGraphMode.NONE
    # the dispatcher is vLLM's own again after the step: the next step without a plan gets its full graph
    runner._runtime.plan = None
    assert decide(runner, 3)[0] == CUDAGraphMode.FULL


def test_mixed_steps_and_dummy_runs_are_vllms_own():
    runner = make_runner(plan=object())
    assert decide(runner, 2, tokens_each=3)[0] == CUDAGraphMode.PIECEWISE  # a prefill step: piecewise anyway
    before = len(runner._runtime.planned)
    mode, _ = decide(runner, 3, prepared=False)  # no inputs prepared (a dummy or capture run): no plan
    assert mode == CUDAGraphMode.FULL and len(runner._runtime.planned) == before


def test_the_dispatcher_without_full_graphs_keeps_the_callers_limits():
    runner = make_runner(plan=None)
    dispatcher = runner.cudagraph_dispatcher
    seam.patch(dispatcher, "dispatch", seam._no_full_graph)
    dispatcher._v2drop_no_full = True
    assert dispatcher.dispatch(3, uniform_decode=True)[0] == CUDAGraphMode.PIECEWISE
    assert dispatcher.dispatch(3, uniform_decode=True, valid_modes={CUDAGraphMode.NONE})[0] == CUDAGraphMode.NONE
    # data parallel: the ranks agreed on FULL (cannot happen with this rank planning: the agreement is the minimum)
    assert dispatcher.dispatch(3, uniform_decode=True, valid_modes={CUDAGraphMode.FULL})[0] == CUDAGraphMode.NONE
    dispatcher._v2drop_no_full = False
    assert dispatcher.dispatch(3, uniform_decode=True)[0] == CUDAGraphMode.FULL


def test_a_plan_under_a_full_graph_is_refused_and_graph_modes_are_logged(caplog):
    config = gpu_like_config()
    runner = make_runner(plan=None)
    metadata = {"model.layers.0.self_attn.attn": object()}
    caplog.set_level(logging.INFO, logger="vllm.v2drop")
    with set_forward_context(metadata, config, cudagraph_runtime_mode=CUDAGraphMode.FULL):
        runner._v2drop_planned = ("batch", None)
        assert seam._step_plan(runner) == ("batch", None)
        runner._v2drop_planned = ("batch", "a plan")
        with pytest.raises(RuntimeError, match="full CUDA graph"):
            seam._step_plan(runner)
    with set_forward_context(metadata, config, cudagraph_runtime_mode=CUDAGraphMode.PIECEWISE):
        for _ in range(2):
            runner._v2drop_planned = ("batch", "a plan")
            assert seam._step_plan(runner) == ("batch", "a plan")
    with set_forward_context(None, config):  # a dummy run: no step, and the prepared plan is not its
        runner._v2drop_planned = ("batch", "a plan")
        assert seam._step_plan(runner) == (None, None)
    lines = [r.getMessage() for r in caplog.records if "first step" in r.getMessage()]
    assert lines == [  # once per kind of step and mode
        "V2Drop: the first step without per-stage attention metadata ran with CUDA graph mode FULL",
        "V2Drop: the first step with per-stage attention metadata ran with CUDA graph mode FULL",
        "V2Drop: the first step with per-stage attention metadata ran with CUDA graph mode PIECEWISE",
    ]
