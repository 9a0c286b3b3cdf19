"""The model-class seam (worker): the V2Drop subclasses of vLLM's VLMs (:mod:`vllm_v2drop.models`)
and the decoder stack the drop loop runs. Declaration only: the code that touches these is the
model classes themselves, which live in ``models/``."""

from __future__ import annotations

from vllm_v2drop.seams._check import CALLS, EXACT, Seam, Touch

__all__ = ["SEAM"]

_M = "vllm.model_executor.models"
_FORWARD = "(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs)"
_LAYER = "(self, positions, hidden_states, residual)"


def _vlm(module: str, cls: str) -> tuple[Touch, ...]:
    """What ``models.V2DropMixin`` overrides on each of vLLM's VLM classes."""
    t = f"{_M}.{module}:{cls}"
    return (
        Touch(f"{t}.__init__", "(self, *, vllm_config, prefix)", CALLS, "models.V2DropMixin.__init__"),
        Touch(f"{t}.forward", _FORWARD, EXACT, "models.V2DropMixin.forward"),
        Touch(f"{t}.embed_multimodal", "(self, **kwargs)", EXACT, "models.V2DropMixin.embed_multimodal"),
    )


SEAM = Seam("model classes", "worker: the V2Drop subclasses of vLLM's VLMs and the decoder stack the drop loop runs", (
    *_vlm("llava", "LlavaForConditionalGeneration"),
    *_vlm("llava_next", "LlavaNextForConditionalGeneration"),
    *_vlm("llava_onevision", "LlavaOnevisionForConditionalGeneration"),
    Touch(f"{_M}.llava_onevision:LlavaOnevisionForConditionalGeneration._process_video_pixels", "(self, inputs)",
          EXACT, "models.V2DropLlavaOnevisionForConditionalGeneration"),
    *_vlm("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    *_vlm("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    *_vlm("qwen3_vl", "Qwen3VLForConditionalGeneration"),
    *_vlm("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"),
    Touch(f"{_M}.qwen3_vl:Qwen3VLForConditionalGeneration._get_deepstack_input_embeds", "(self, num_tokens)",
          CALLS, "models._DeepStack"),
    Touch(f"{_M}.qwen3_vl:Qwen3VLForConditionalGeneration._clear_deepstack_input_embeds", "(self, num_tokens)",
          CALLS, "models._DeepStack"),
    # the drop loop (runtime.V2DropRuntime.forward) runs the language model's layers itself
    *(Touch(f"{_M}.{m}:{cls}.forward", _LAYER, CALLS, "worker.runtime.V2DropRuntime.forward") for m, cls in (
        ("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer"), ("qwen3_vl", "Qwen3VLDecoderLayer"),
        ("qwen3_vl_moe", "Qwen3VLMoeDecoderLayer"))),
    *(Touch(f"{_M}.{m}:{cls}.embed_input_ids", "(self, input_ids)", CALLS, "worker.runtime.V2DropRuntime.forward")
      for m, cls in (("llama", "LlamaModel"), ("qwen2", "Qwen2Model"), ("qwen3_vl", "Qwen3LLMModel"),
                     ("qwen3_vl_moe", "Qwen3MoeLLMModel"))),
))
