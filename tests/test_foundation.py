"""Stock ``vllm serve`` answers an image chat with a tiny model over real HTTP.

(That stock vLLM runs every tiny model deterministically and agrees with transformers is checked
on the stock engines of ``test_engine.py``, the identity oracle.)
"""

from __future__ import annotations

import base64
import io

import pytest
from conftest import make_image

pytestmark = pytest.mark.slow


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
