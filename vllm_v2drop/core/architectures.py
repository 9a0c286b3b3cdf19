"""The vLLM architectures V2Drop serves and the names of their V2Drop variants (no vLLM import)."""

from __future__ import annotations

__all__ = ["ARCHITECTURES", "MODEL_IMPL", "V2DROP_ARCHITECTURES", "base_architecture", "is_v2drop_model"]

#: vLLM architecture -> V2Drop architecture (a class of :mod:`vllm_v2drop.models`)
ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "V2DropLlavaForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "V2DropLlavaOnevisionForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "V2DropQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "V2DropQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "V2DropQwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration": "V2DropQwen3VLMoeForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "V2DropLlavaNextForConditionalGeneration",
}
V2DROP_ARCHITECTURES = frozenset(ARCHITECTURES.values())
MODEL_IMPL = "v2drop"


def base_architecture(architecture: str) -> str:
    """``V2DropQwen2VLForConditionalGeneration`` -> ``Qwen2VLForConditionalGeneration``."""
    return architecture.removeprefix("V2Drop")


def is_v2drop_model(vllm_config) -> bool:
    """Whether an engine's config serves a V2Drop architecture."""
    model_config = getattr(vllm_config, "model_config", None)
    return getattr(model_config, "architecture", None) in V2DROP_ARCHITECTURES
