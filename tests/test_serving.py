"""Serving as users run it: ``vllm serve MODEL --model-impl v2drop`` and the official ``openai`` client.

One module-scoped server on the tiny LLaVA-OneVision model. Checks image / video / text chat
requests (streaming and not), concurrent requests against their sequential answers, client
errors that must come back as HTTP 4xx with a clear message while the server keeps serving,
the V2Drop lines of the server log, and ``vllm bench serve`` (vLLM's own benchmark CLI) on a
short offline multimodal workload.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from vllm_v2drop.dev.demo import (
    image_data_url,
    image_part,
    parse_request_stats,
    read_log,
    startup_lines,
    stats_for,
    video_data_url,
    video_part,
)

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

MAX_TOKENS = 8
SERVER_ARGS = [
    "--model-impl", "v2drop",
    "--enforce-eager", "--dtype", "float32",
    "--max-model-len", "4096",
    "--kv-cache-memory-bytes", str(256 << 20),
    "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 1}),
    "--seed", "0",
]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    """``(base_url, model, log_path)`` of one V2Drop server for the whole module."""
    from vllm_v2drop.dev.server import serve

    model = str(tiny_models["llava-onevision"])
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with serve(model, SERVER_ARGS, log_path=log_path) as url:
        yield url, model, log_path


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="EMPTY", max_retries=0, timeout=120)


def text(t: str) -> dict:
    return {"type": "text", "text": t}


IMAGE = [image_part(image_data_url((160, 120), seed=1)), text("What is in this image?")]
TWO_IMAGES = [image_part(image_data_url((128, 128), seed=2)), image_part(image_data_url((200, 100), seed=3)),
              text("Compare the two images.")]
VIDEO = [video_part(video_data_url(8, (64, 64), seed=4)), text("What happens in this video?")]
TEXT = [text("Tell me about the sky.")]


def ask(client, model, content, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={"ignore_eos": True}, **kw)


def ask_stream(client, model, content) -> tuple[str, str, int]:
    """Stream a chat completion; return (response id, text, completion tokens from the final usage chunk)."""
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={"ignore_eos": True}, stream=True, stream_options={"include_usage": True})
    rid, parts, completion_tokens = None, [], None
    for chunk in stream:
        rid = rid or chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
    return rid, "".join(parts), completion_tokens


def assert_still_serving(client, model):
    resp = ask(client, model, IMAGE)
    assert resp.choices[0].message.content and resp.usage.completion_tokens == MAX_TOKENS


# ------------------------------------------------------------------------------------------ start-up


def test_startup_log_names_the_schedule(server):
    _, _, log_path = server
    lines = startup_lines(read_log(log_path))
    assert any(line.startswith("V2Drop: preset 'video-25'") and "layers [1, 5, 6]" in line for line in lines), lines
    assert any(line.startswith("V2Drop forces: multimodal items never split") for line in lines), lines
    assert any(line.startswith("V2Drop prefix caching: blocks before") for line in lines), lines


def test_models_endpoint_lists_the_model(client, server):
    assert [m.id for m in client.models.list().data] == [server[1]]


# ---------------------------------------------------------------------------------- chat requests


@pytest.mark.parametrize("name,content,items", [("image", IMAGE, 1), ("two_images", TWO_IMAGES, 2),
                                                ("video", VIDEO, 1)])
def test_multimodal_chat_is_pruned_and_logged_once(client, server, name, content, items):
    _, model, log_path = server
    resp = ask(client, model, content)
    assert resp.choices[0].message.content
    assert resp.usage.completion_tokens == MAX_TOKENS
    stats = stats_for(log_path, resp.id)
    assert len(stats) == 1, f"expected one V2Drop line for {resp.id}, got {stats}"
    s = stats[0]
    assert s.items == items
    assert 0 < s.vision_rows < resp.usage.prompt_tokens
    assert s.rows_per_stage[0] == s.vision_rows
    assert list(s.rows_per_stage) == sorted(s.rows_per_stage, reverse=True) and s.rows_per_stage[-1] < s.vision_rows
    assert s.layers == (1, 5, 6)
    assert 0 < s.retention < 0.5 and s.kv_slots_not_written > 0


def test_text_only_chat_is_not_pruned(client, server):
    _, model, log_path = server
    resp = ask(client, model, TEXT)
    assert resp.choices[0].message.content and resp.usage.completion_tokens == MAX_TOKENS
    assert stats_for(log_path, resp.id, timeout=1.0) == []


@pytest.mark.parametrize("name,content", [("image", IMAGE), ("video", VIDEO), ("text", TEXT)])
def test_streaming_equals_non_streaming(client, server, name, content):
    _, model, log_path = server
    full = ask(client, model, content)
    rid, streamed, completion_tokens = ask_stream(client, model, content)
    assert streamed == full.choices[0].message.content
    assert completion_tokens == MAX_TOKENS
    if name != "text":
        assert len(stats_for(log_path, rid)) == 1


def test_concurrent_requests_equal_sequential(client, server):
    _, model, log_path = server
    contents = [IMAGE, VIDEO, TEXT, TWO_IMAGES,
                [image_part(image_data_url((96, 160), seed=11)), text("And this one?")],
                [video_part(video_data_url(6, (96, 64), seed=12)), text("Describe the motion.")]]
    sequential = [ask(client, model, c).choices[0].message.content for c in contents]
    with ThreadPoolExecutor(len(contents)) as pool:
        responses = list(pool.map(lambda c: ask(client, model, c), contents * 2))
    answers = [r.choices[0].message.content for r in responses]
    assert answers == sequential * 2
    for r, c in zip(responses, contents * 2):  # one stats line per multimodal request, none for text
        assert len(stats_for(log_path, r.id, timeout=0 if c is TEXT else 5)) == (0 if c is TEXT else 1)


# ----------------------------------------------------------------------------------- client errors


def _status_error(fn) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        fn()
    return info.value


@pytest.mark.parametrize("url,status,message", [
    ("data:image/png;base64,@@not-base64@@", 400, "base64"),
    ("data:image/png;base64," + base64.b64encode(b"this is not an image").decode(), 400, "Failed to load image"),
])
def test_malformed_image_is_a_400(client, server, url, status, message):
    _, model, _ = server
    err = _status_error(lambda: ask(client, model, [image_part(url), text("What is this?")]))
    assert err.status_code == status
    assert message in err.message, err.message
    assert_still_serving(client, model)


def test_malformed_video_is_a_400(client, server):
    _, model, _ = server
    url = "data:video/mp4;base64," + base64.b64encode(b"\x00" * 64).decode()
    err = _status_error(lambda: ask(client, model, [video_part(url), text("What is this?")]))
    assert 400 <= err.status_code < 500, (err.status_code, err.message)
    assert_still_serving(client, model)


def test_unknown_model_is_a_404(client, server):
    _, model, _ = server
    err = _status_error(lambda: ask(client, "no-such-model", IMAGE))
    assert err.status_code == 404
    assert "The model `no-such-model` does not exist" in err.message, err.message
    assert_still_serving(client, model)


def test_over_long_prompt_is_a_400(client, server):
    _, model, _ = server
    long_text = [text("look " * 5000)]
    err = _status_error(lambda: ask(client, model, long_text))
    assert err.status_code == 400
    assert "maximum context length is 4096 tokens" in err.message, err.message
    # Same with images: the vision rows count toward the limit.
    many = [image_part(image_data_url((640, 640), seed=s)) for s in (5, 6)] + [text("look " * 3000)]
    err = _status_error(lambda: ask(client, model, many))
    assert err.status_code == 400 and "maximum context length" in err.message, err.message
    assert_still_serving(client, model)


def test_too_many_images_is_a_400(client, server):
    _, model, _ = server
    three = [image_part(image_data_url((64, 64), seed=s)) for s in range(3)] + [text("x")]
    err = _status_error(lambda: ask(client, model, three))
    assert err.status_code == 400
    assert "image" in err.message and "2" in err.message, err.message
    assert_still_serving(client, model)


def test_every_pruned_request_logged_exactly_once(server):
    """No request id appears twice in the per-request V2Drop lines (preemption/retries would show here)."""
    ids = [s.request_id for s in parse_request_stats(read_log(server[2]))]
    assert ids and len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------- vllm bench serve


def test_vllm_bench_serve_multimodal(server, tmp_path):
    """vLLM's own benchmark CLI against the V2Drop server: random images (random-mm, offline)."""
    url, model, log_path = server
    before = len(parse_request_stats(read_log(log_path)))
    vllm_bin = Path(sys.executable).with_name("vllm")
    num_prompts = 8
    cmd = [str(vllm_bin), "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
           "--base-url", url, "--model", model, "--tokenizer", model,
           "--dataset-name", "random-mm", "--num-prompts", str(num_prompts),
           "--random-input-len", "32", "--random-output-len", "4", "--ignore-eos",
           "--random-mm-base-items-per-request", "1",
           "--random-mm-bucket-config", "{(128, 128, 1): 0.5, (256, 192, 1): 0.5}",
           "--random-mm-limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
           "--max-concurrency", "2", "--seed", "0",
           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == num_prompts, result
    assert result.get("failed", 0) == 0, result
    assert result["total_output_tokens"] == 4 * num_prompts
    after = parse_request_stats(read_log(log_path))
    assert len(after) - before == num_prompts  # every benchmark request went through V2Drop
