"""How the plugin plugs into vLLM, checked at start-up (vLLM's real config path, no engine).

``EngineArgs.create_engine_config`` is what ``vllm serve`` and ``LLM(...)`` run before
any engine starts: architecture resolution, the config hook, the validation.
"""

from __future__ import annotations

import importlib.metadata

import pytest
from conftest import engine_config

from vllm_v2drop.core.architectures import ARCHITECTURES


def startup_error(model_dir, **kw) -> str:
    with pytest.raises(Exception) as err:  # vLLM wraps hook errors in pydantic's ValidationError
        engine_config(model_dir, **kw)
    return str(err.value)


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "vllm_v2drop:register" for ep in eps)


def test_register_is_idempotent_and_registers_every_variant():
    from vllm.model_executor.models import ModelRegistry

    import vllm_v2drop

    vllm_v2drop.register()
    vllm_v2drop.register()
    assert set(ARCHITECTURES.values()) <= set(ModelRegistry.get_supported_archs())


@pytest.mark.parametrize("arch", ["llava", "llava-onevision", "qwen2-vl", "qwen2.5-vl"])
def test_model_impl_selects_the_v2drop_variant(arch, tiny_models):
    stock = engine_config(tiny_models[arch])
    v2 = engine_config(tiny_models[arch], model_impl="v2drop")
    assert v2.model_config.architecture == ARCHITECTURES[stock.model_config.architecture]
    # Without --model-impl v2drop nothing changes.
    assert not stock.model_config.architecture.startswith("V2Drop")
    assert stock.cache_config.enable_prefix_caching is True
    assert stock.scheduler_config.disable_chunked_mm_input is False


def test_forced_settings(tiny_models):
    cfg = engine_config(tiny_models["qwen2-vl"], model_impl="v2drop")
    assert cfg.cache_config.enable_prefix_caching is True  # vLLM's default stays (Level 1 prefix caching)
    assert cfg.scheduler_config.disable_chunked_mm_input is True
    off = engine_config(tiny_models["qwen2-vl"], model_impl="v2drop", enable_prefix_caching=False)
    assert off.cache_config.enable_prefix_caching is False


def test_chunked_items_lets_items_split(tiny_models):
    """With chunked_items vLLM's chunked prefill may split a vision item, even with a step budget
    smaller than the largest item (vLLM refuses that budget when items must be whole)."""
    chunked = {"v2drop": {"chunked_items": True}}
    cfg = engine_config(tiny_models["qwen2-vl"], model_impl="v2drop", additional_config=chunked,
                        max_num_batched_tokens=16, max_num_seqs=4)
    assert cfg.scheduler_config.disable_chunked_mm_input is False
    assert cfg.scheduler_config.max_num_batched_tokens == 16


@pytest.mark.parametrize("arch, schedule, kw, refused", [
    ("qwen2-vl", {}, {"disable_chunked_mm_input": True}, "disable_chunked_mm_input"),
    ("qwen3-vl", {}, {"dtype": "float32"}, "DeepStack"),  # the tiny depth's default schedule drops at layer 1
    # the tiny towers feed DeepStack levels after layers 0, 1, 2: a first drop at layer 2 is one too early
    ("qwen3-vl", {"layers": [2, 5], "keep_ratios": [0.5, 0.5]}, {}, "DeepStack"),
], ids=["disable-chunked-mm-input", "deepstack", "deepstack-last-level"])
def test_chunked_items_refuses_what_it_cannot_do(tiny_models, arch, schedule, kw, refused):
    config = {"v2drop": {**schedule, "chunked_items": True}}
    msg = startup_error(tiny_models[arch], model_impl="v2drop", additional_config=config, **kw)
    line = next((ln for ln in msg.splitlines() if "V2Drop chunked_items cannot run with:" in ln), msg)
    assert refused in line, msg


@pytest.mark.parametrize("arch", ["qwen3-vl", "qwen3-vl-moe"])
def test_chunked_items_takes_qwen3_vl_drops_after_deepstack(tiny_models, arch):
    """A first drop layer after the last DeepStack level (layer 3 on the tiny towers) starts."""
    config = {"v2drop": {"layers": [3, 5], "keep_ratios": [0.5, 0.5], "chunked_items": True}}
    cfg = engine_config(tiny_models[arch], model_impl="v2drop", additional_config=config, max_num_batched_tokens=16)
    assert cfg.scheduler_config.disable_chunked_mm_input is False


def test_hf_overrides_select_a_variant(tiny_models):
    cfg = engine_config(
        tiny_models["qwen2-vl"], hf_overrides={"architectures": ["V2DropQwen2VLForConditionalGeneration"]}
    )
    assert cfg.model_config.architecture == "V2DropQwen2VLForConditionalGeneration"
    assert cfg.scheduler_config.disable_chunked_mm_input is True


def test_unsupported_architecture_fails_with_the_supported_list(tiny_models):
    msg = startup_error(tiny_models["qwen2-vl"], model_impl="v2drop",
                        hf_overrides={"architectures": ["Qwen2ForCausalLM"]})
    assert "--model-impl v2drop does not support architecture(s) ['Qwen2ForCausalLM']" in msg
    for arch in ARCHITECTURES:
        assert arch in msg


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"layers": [1, 9], "keep_ratios": [0.5, 0.5]}, "layers: layer 9 does not exist in a model with 8 layers"),
        ({"bogus": 1}, "bogus: unknown key (allowed keys: preset, layers"),
        ({"keep_ratios": [1.5], "layers": [2]}, "keep_ratios"),
        ({"preset": "nope"}, "preset"),
    ],
)
def test_bad_config_fails_at_startup(tiny_models, config, expected):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_v2drop.config import V2DropConfigError
    from vllm_v2drop.errors import startup_error as unwrap

    args = EngineArgs(model=str(tiny_models["qwen2-vl"]), model_impl="v2drop", additional_config={"v2drop": config})
    with pytest.raises(Exception) as err:
        args.create_engine_config()
    ours = unwrap(err.value)  # the caller can reach V2Drop's own error inside vLLM's wrapper
    assert isinstance(ours, V2DropConfigError)
    assert str(ours).startswith("Invalid V2Drop configuration (--additional-config")
    assert expected in str(ours)


def test_uncaught_startup_error_is_one_line(monkeypatch, capsys):
    """A program that dies of a V2Drop refusal prints its message alone; other errors keep their handler."""
    import sys

    from pydantic.dataclasses import dataclass

    from vllm_v2drop.config import V2DropConfigError
    from vllm_v2drop.errors import install_excepthook

    @dataclass
    class Config:  # raises from __post_init__ as vLLM's VllmConfig runs its config hook
        bad: bool = True

        def __post_init__(self):
            if self.bad:
                raise V2DropConfigError("layers: layer 40 does not exist")

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append(a[1]))
    install_excepthook()
    install_excepthook()  # idempotent: one handler, chained once
    try:
        Config()
    except Exception as exc:  # noqa: BLE001
        wrapped = exc
    assert type(wrapped).__name__ == "ValidationError"
    sys.excepthook(type(wrapped), wrapped, wrapped.__traceback__)
    assert capsys.readouterr().err == (
        "ERROR: Invalid V2Drop configuration (--additional-config '{\"v2drop\": ...}'): "
        "layers: layer 40 does not exist\n")
    assert seen == []
    other = KeyError("not ours")
    sys.excepthook(KeyError, other, None)
    assert seen == [other]


def test_vllm_serve_with_a_bad_config_ends_with_one_line(tiny_models, tmp_path):
    """``vllm serve`` (the real CLI) stops before any engine starts, its last words the one-line message."""
    import os
    import subprocess
    import sys

    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    proc = subprocess.run(
        [vllm, "serve", str(tiny_models["qwen2-vl"]), "--model-impl", "v2drop",
         "--additional-config", '{"v2drop": {"layers": [40], "keep_ratios": [0.5]}}'],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (
        "ERROR: Invalid V2Drop configuration (--additional-config '{\"v2drop\": ...}'): layers: layer 40 does "
        "not exist in a model with 8 layers (layers must be < 8) (allowed: null or a list of strictly "
        "increasing integers >= 1 and < the model's layer count)")
    assert "Traceback" not in proc.stderr and "pydantic" not in proc.stderr


def test_refuses_speculative_decoding(tiny_models):
    msg = startup_error(
        tiny_models["qwen2-vl"], model_impl="v2drop",
        speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
    )
    assert "V2Drop (--model-impl v2drop) cannot run with: speculative decoding" in msg


@pytest.mark.parametrize("arch", ["qwen3-vl", "qwen3-vl-moe", "llava-next"])
def test_model_impl_selects_new_architectures(tiny_models, arch):
    cfg = engine_config(tiny_models[arch], model_impl="v2drop", dtype="float32")
    assert cfg.model_config.architecture == ARCHITECTURES[cfg.model_config.hf_config.architectures[0]]
    assert cfg.model_config.architecture.startswith("V2Drop")


def test_refuses_vllm_video_pruning(tiny_models):
    msg = startup_error(tiny_models["qwen3-vl"], model_impl="v2drop", dtype="float32", video_pruning_rate=0.5)
    assert "cannot run with: vLLM's own video token pruning (--video-pruning-rate > 0)" in msg


# Settings under which a stage's layers would silently not see their own metadata: each refused at
# start-up, the message naming the setting and the reason.
@pytest.mark.parametrize(
    "kw, env, setting, why",
    [
        ({}, {"VLLM_USE_BREAKABLE_CUDAGRAPH": "1"}, "breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH=1)",
         "replay the graph captured without drops"),
        ({"compilation_config": {"mode": 1}}, {},
         "stock torch.compile (compilation_config mode STOCK_TORCH_COMPILE, -cc.mode=1)", "the drop loop"),
        ({"compilation_config": {"pass_config": {"fuse_attn_quant": True}}}, {},
         "compilation_config pass_config.fuse_attn_quant", "full ones"),
        ({"compilation_config": {"use_inductor_graph_partition": True}}, {},
         "compilation_config use_inductor_graph_partition", "no longer a graph split point"),
        ({"enable_dbo": True}, {}, "micro-batching / dual batch overlap (--enable-dbo, --ubatch-size > 1)",
         "one per micro-batch"),
        ({"ubatch_size": 2}, {}, "micro-batching / dual batch overlap (--enable-dbo, --ubatch-size > 1)",
         "one per micro-batch"),
        ({"enable_lora": True}, {}, "LoRA (--enable-lora)", "not cut with the dropped rows"),
    ],
    ids=["breakable-cudagraph", "stock-torch-compile", "fuse-attn-quant", "inductor-graph-partition", "dbo",
         "ubatch-size", "lora"],
)
def test_refuses_what_defeats_stage_metadata(tiny_models, monkeypatch, kw, env, setting, why):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    msg = startup_error(tiny_models["qwen2-vl"], model_impl="v2drop", **kw)
    line = next((ln for ln in msg.splitlines() if "V2Drop (--model-impl v2drop) cannot run with:" in ln), msg)
    assert setting in line and why in line, msg


def test_default_compilation_is_accepted(tiny_models):
    """vLLM's default compile mode on this platform is not refused, nor are the settings above when off."""
    cfg = engine_config(tiny_models["qwen2-vl"], model_impl="v2drop",
                        compilation_config={"use_inductor_graph_partition": False,
                                            "pass_config": {"fuse_attn_quant": False}})
    assert cfg.model_config.architecture.startswith("V2Drop")
