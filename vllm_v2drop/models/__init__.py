"""V2Drop variants of vLLM's VLMs: thin subclasses over vLLM's own model classes.

Each inherits its vLLM parent's weights, multimodal processor and vision path;
the mixin only adds the runtime and routes steps that drop rows through
:meth:`V2DropRuntime.forward`. Steps with nothing to drop (decode, text-only,
dummy runs) call the parent's forward: vLLM's compiled language model.

Adding a model (README, "Adding a model"): subclass ``V2DropMixin`` first, then vLLM's
class. A subclass says only what differs from the defaults below:

* where the decoder stack is: :meth:`V2DropMixin.v2drop_decoder` (default
  ``self.language_model.model``, a module with ``layers``, ``start_layer``, ``end_layer``,
  ``norm`` and ``embed_input_ids`` whose layers take ``(positions, hidden, residual)``);
* what the parent's language model adds per row between layers, which the drop loop
  must carry with the kept rows: :meth:`V2DropMixin.v2drop_adds_after` (Qwen3-VL's
  DeepStack), and :meth:`V2DropMixin.v2drop_forward_done` for clean-up the parent's
  forward would have done.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration

from vllm_v2drop.config import resolve_schedule
from vllm_v2drop.seams import runner
from vllm_v2drop.seams._patch import patch
from vllm_v2drop.worker.runtime import ROWS_KEY, V2DropRuntime


def _drop_loop_backend(vllm_config, schedule) -> str | None:
    """The ``torch.compile`` backend of the drop loop's segments: vLLM's own (Inductor) where vLLM
    compiles the language model, None (eager) where it runs it eagerly or ``compile_drop_loop`` is off."""
    from vllm.config import CompilationMode

    compilation = vllm_config.compilation_config
    if not schedule.compile_drop_loop or vllm_config.model_config.enforce_eager or compilation.mode in (
            None, CompilationMode.NONE):
        return None
    return "eager" if compilation.backend == "eager" else "inductor"


class V2DropMixin:
    """Adds V2Drop to a vLLM VLM (decoder stack: :meth:`v2drop_decoder`)."""

    def v2drop_decoder(self) -> torch.nn.Module:
        """The decoder stack the drop loop runs (vLLM's ``LlamaModel`` / ``Qwen2Model`` / ...)."""
        return self.language_model.model

    def v2drop_adds_after(self, inputs_embeds) -> dict[int, torch.Tensor]:
        """``{l: rows}``: tensors (one row per step row) the parent's language model adds to the
        hidden states after decoder layer ``l``; the drop loop adds them on the kept rows."""
        return {}

    def v2drop_forward_done(self, inputs_embeds) -> None:
        """Called after a drop step's forward (the parent's per-step clean-up)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        lm = self.v2drop_decoder()
        layers = lm.layers[lm.start_layer : lm.end_layer]
        names = [layer.self_attn.attn.layer_name for layer in layers]
        schedule = resolve_schedule(vllm_config)
        self.v2drop_runtime = V2DropRuntime(schedule, names, first_layer=lm.start_layer,
                                            compile_backend=_drop_loop_backend(vllm_config, schedule))
        runner.install_worker(self.v2drop_runtime, [layer.self_attn.attn for layer in layers])
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            # a later pipeline rank also receives which step rows the previous rank kept
            def with_rows(make_empty):
                def make_empty_intermediate_tensors(batch_size, dtype, device):
                    tensors = make_empty(batch_size, dtype, device)
                    tensors[ROWS_KEY] = torch.zeros(batch_size, dtype=torch.int64, device=device)
                    return tensors

                return make_empty_intermediate_tensors

            patch(self, "make_empty_intermediate_tensors", with_rows)

    def embed_multimodal(self, **kwargs):
        out = super().embed_multimodal(**kwargs)
        self.v2drop_runtime.encoded(len(out) if out is not None else 0)
        return out

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        num_tokens = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        drop = self.v2drop_runtime.current(num_tokens)
        if drop is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if intermediate_tensors is not None:  # a later pipeline rank: no embeddings here
            inputs_embeds = None
        try:
            adds = self.v2drop_adds_after(inputs_embeds)
            return self.v2drop_runtime.forward(self.v2drop_decoder(), drop, input_ids, positions, inputs_embeds,
                                               adds_after=adds, intermediate_tensors=intermediate_tensors)
        finally:
            self.v2drop_forward_done(inputs_embeds)


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


class V2DropLlavaNextForConditionalGeneration(V2DropMixin, LlavaNextForConditionalGeneration):
    pass


class _DeepStack:
    """Qwen3-VL: DeepStack visual features, added after the first decoder layers at the vision rows.

    vLLM's ``embed_input_ids`` leaves them in a buffer on the model; its ``forward`` reads them
    (only when given ``inputs_embeds``) and clears the buffer afterwards; so do these.
    """

    def v2drop_adds_after(self, inputs_embeds) -> dict[int, torch.Tensor]:
        if inputs_embeds is None or not self.use_deepstack:
            return {}
        ds = self._get_deepstack_input_embeds(inputs_embeds.size(0))
        return {} if ds is None else {l: ds[f"deepstack_input_embeds_{l}"] for l in range(self.deepstack_num_level)}

    def v2drop_forward_done(self, inputs_embeds) -> None:
        if inputs_embeds is not None:
            self._clear_deepstack_input_embeds(inputs_embeds.size(0))


class V2DropQwen3VLForConditionalGeneration(_DeepStack, V2DropMixin, Qwen3VLForConditionalGeneration):
    pass


class V2DropQwen3VLMoeForConditionalGeneration(_DeepStack, V2DropMixin, Qwen3VLMoeForConditionalGeneration):
    pass
