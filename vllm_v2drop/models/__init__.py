"""V2Drop variants of vLLM's VLMs: thin subclasses over vLLM's own model classes.

Each inherits its vLLM parent's weights, multimodal processor and vision path;
the mixin only adds the runtime and routes steps that drop rows through
:meth:`V2DropRuntime.forward`. Steps with nothing to drop (decode, text-only,
dummy runs) call the parent's forward: vLLM's compiled language model.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

from vllm_v2drop.runtime import V2DropRuntime


class V2DropMixin:
    """Adds V2Drop to a vLLM VLM whose language model is ``self.language_model.model``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from vllm_v2drop.integration import resolve_schedule
        from vllm_v2drop.runner import v1

        lm = self.language_model.model
        names = [layer.self_attn.attn.layer_name for layer in lm.layers[lm.start_layer : lm.end_layer]]
        self.v2drop_runtime = V2DropRuntime(resolve_schedule(vllm_config), names)
        if self.v2drop_runtime.schedule.kv_mode == "per_stage" and self.v2drop_runtime.schedule.layers:
            from vllm_v2drop.kv import install_stage_specs  # one KV-cache group per stage

            attns = [layer.self_attn.attn for layer in lm.layers[lm.start_layer : lm.end_layer]]
            install_stage_specs(attns, self.v2drop_runtime.stage_of_layer, self.v2drop_runtime.schedule)
        v1.install()

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        num_tokens = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        drop = self.v2drop_runtime.current(num_tokens)
        if drop is None or intermediate_tensors is not None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        return self.v2drop_runtime.forward(self.language_model.model, drop, input_ids, positions, inputs_embeds)


class V2DropLlavaForConditionalGeneration(V2DropMixin, LlavaForConditionalGeneration):
    pass


class V2DropLlavaOnevisionForConditionalGeneration(V2DropMixin, LlavaOnevisionForConditionalGeneration):
    def _process_video_pixels(self, inputs):
        # vLLM 0.32 bug: videos of different frame counts in one batch come back as [1, rows, dim]
        # tensors and embed_multimodal asserts 2-D embeddings; give each video its [rows, dim].
        videos = super()._process_video_pixels(inputs)
        return videos if isinstance(videos, torch.Tensor) else [v.reshape(-1, v.shape[-1]) for v in videos]


class V2DropQwen2VLForConditionalGeneration(V2DropMixin, Qwen2VLForConditionalGeneration):
    pass


class V2DropQwen2_5_VLForConditionalGeneration(V2DropMixin, Qwen2_5_VLForConditionalGeneration):
    pass
