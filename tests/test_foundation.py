"""Stock vLLM (CPU engine) runs every tiny model, deterministically, and agrees with transformers.

One engine per arch (class-scoped, so it is gone before the next one starts and before the
server test). Greedy float32 tokens from vLLM and from transformers' ``generate`` must match:
that proves both read the same weights, processor and template.
"""

from __future__ import annotations

import base64
import io

import psutil
import pytest
from conftest import ARCHS, VIDEO_ARCHS, greedy, llm_engine, make_image, make_video, mm_request, prompt, video_metadata

pytestmark = pytest.mark.slow

N_TOKENS = 16


def _cases(arch: str) -> dict:
    """name -> (images, video) for one request each."""
    cases = {"image": ([make_image("small")], None), "two-images": ([make_image("wide", 1), make_image("large", 2)], None)}
    if arch in VIDEO_ARCHS:
        # transformers 5.19's Qwen2.5-VL get_rope_index advances text positions after a video by
        # max(h, w) only, where vLLM (and the original Qwen code) use max(position) + 1; they agree
        # while 2 * (grid_t - 1) < max(h, w), so the comparison video for Qwen2.5-VL has 4 frames.
        cases["video"] = ([], make_video(frames=4 if arch == "qwen2.5-vl" else 8))
    return cases


@pytest.fixture(scope="class", params=ARCHS)
def engine(request, tiny_models):
    arch = request.param
    with llm_engine(tiny_models[arch]) as llm:
        yield arch, tiny_models[arch], llm
    # The engine core subprocess is really gone (and with it the model and KV cache memory).
    assert llm._v2drop_children, "expected vLLM V1 to run the engine core in a subprocess"
    assert not [pid for pid in llm._v2drop_children if psutil.pid_exists(pid)]


class TestEngine:
    outputs: dict = {}

    def test_generate_deterministic(self, engine):
        arch, model_dir, llm = engine
        cases = _cases(arch)
        reqs = [mm_request(arch, model_dir, images, video) for images, video in cases.values()]
        first = [o.outputs[0].token_ids for o in llm.generate(reqs, greedy(N_TOKENS), use_tqdm=False)]
        second = [o.outputs[0].token_ids for o in llm.generate(reqs, greedy(N_TOKENS), use_tqdm=False)]
        assert first == second
        for name, toks in zip(cases, first):
            assert len(toks) == N_TOKENS, name
            assert len(set(toks)) > 2, (name, toks)  # not one token repeated
        assert len({tuple(t) for t in first}) == len(first)  # the inputs matter
        TestEngine.outputs[arch] = dict(zip(cases, map(list, first)))

    def test_matches_transformers(self, engine):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

        arch, model_dir, _ = engine
        if arch not in TestEngine.outputs:
            pytest.skip("needs test_generate_deterministic's outputs")
        proc = AutoProcessor.from_pretrained(model_dir)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        # eos_token_id=[]: never stop and never suppress EOS, like vLLM's ignore_eos (None would fall
        # back to the model's EOS and stop; min_new_tokens would mask EOS out of the argmax).
        gen = GenerationConfig(do_sample=False, max_new_tokens=N_TOKENS, eos_token_id=[],
                               pad_token_id=proc.tokenizer.pad_token_id)
        for name, (images, video) in _cases(arch).items():
            kw: dict = {"images": list(images)} if images else {}
            if video is not None:
                kw["videos"] = [video]
                if arch.startswith("qwen"):
                    kw.update(video_metadata=[video_metadata(video)], do_sample_frames=False)
            text = prompt(model_dir, n_images=len(images), video=video is not None)
            inputs = proc(text=[text], return_tensors="pt", **kw)
            with torch.no_grad():
                out = model.generate(**inputs, generation_config=gen)
            hf = out[0, inputs["input_ids"].shape[1]:].tolist()
            assert hf == TestEngine.outputs[arch][name], (arch, name)


def _png_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_vllm_serve_image_chat(tiny_models):
    import openai

    from vllm_v2drop.dev.server import serve

    model = str(tiny_models["llava-onevision"])
    args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "4096",
            "--kv-cache-memory-bytes", str(256 << 20), "--limit-mm-per-prompt", '{"image": 1, "video": 0}']
    with serve(model, args) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY")
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_data_url(make_image("small"))}},
            {"type": "text", "text": "Describe this."}]}]
        resp = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.0,
                                              extra_body={"ignore_eos": True})
        assert resp.usage.completion_tokens == 8
        assert resp.usage.prompt_tokens > 336  # the image's 336 vision rows are in the prompt
        assert resp.choices[0].message.content
