"""``vllm-v2drop agreement`` (the budget finder): the requests file, the command line, and one run
end to end on the tiny Qwen2-VL (one engine), checked against two separate offline runs."""

from __future__ import annotations

import base64
import io
import json
import struct

import pytest
from conftest import ensure_model, make_image, shutdown_llm
from test_probe import _unexpanded

from vllm_v2drop import cli
from vllm_v2drop.agreement import load_requests, make_engine, measure_budgets, run
from vllm_v2drop.core.quality import measure, rows_from_prompt_logprobs


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def requests_file(tmp_path):
    """Three small requests: an image by relative path, one by data URL, two images; one line a bare list."""
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.png").write_bytes(_png_bytes(make_image("large", 41)))
    url = "data:image/png;base64," + base64.b64encode(_png_bytes(make_image("wide", 42))).decode()
    img = lambda u: {"type": "image_url", "image_url": {"url": u}}  # noqa: E731
    lines = [
        {"messages": [{"role": "user", "content": [img("media/a.png"), {"type": "text", "text": "What is it?"}]}]},
        {"messages": [{"role": "user", "content": [img(url), {"type": "text", "text": "Describe it."}]}],
         "max_tokens": 5},
        [{"role": "user", "content": [img("media/a.png"), img(url), {"type": "text", "text": "Compare."}]}],
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_requests_file_paths_become_file_urls(requests_file, tmp_path):
    reqs, folders = load_requests(requests_file)
    assert len(reqs) == 3 and folders == [str(tmp_path / "media")]
    first = reqs[0]["messages"][0]["content"][0]["image_url"]["url"]
    assert first == (tmp_path / "media" / "a.png").as_uri()
    assert reqs[1]["max_tokens"] == 5 and reqs[1]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "missing.png"}}]}]}))
    with pytest.raises(ValueError, match="no such file"):
        load_requests(bad)
    bad.write_text('{"prompt": "x"}')
    with pytest.raises(ValueError, match="messages"):
        load_requests(bad)


def test_command_line_reaches_the_finder(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("vllm_v2drop.agreement.run", lambda *a: seen.setdefault("args", a) and "TABLE")
    assert cli.main(["agreement", "--model", "M", "--requests", "R.jsonl", "--budgets", "0.4, 0.2",
                     "--png", "o.png", "--max-tokens", "7", "--enforce-eager", "--max-model-len", "1024",
                     "--v2drop-config", '{"kv_mode": "per_stage"}']) == 0
    model, reqs, budgets, png, max_tokens, cfg, engine = seen["args"]
    assert (model, reqs, budgets, png, max_tokens, cfg) == ("M", "R.jsonl", [0.4, 0.2], "o.png", 7,
                                                            {"kv_mode": "per_stage"})
    assert engine == {"dtype": "auto", "max_model_len": 1024, "enforce_eager": True}
    assert "TABLE" in capsys.readouterr().out


@pytest.mark.slow
def test_budget_finder_end_to_end(requests_file, tmp_path):
    from vllm import SamplingParams
    from transformers import AutoTokenizer

    model = ensure_model("qwen2-vl")
    budgets = [0.5, 0.15]
    reqs, folders = load_requests(requests_file)
    llm = make_engine(str(model), len(reqs) * len(budgets), folders,
                      engine_args=dict(dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
                                       limit_mm_per_prompt={"image": 2}, kv_cache_memory_bytes=128 << 20))
    try:
        png = tmp_path / "curve.png"
        text = run(str(model), str(requests_file), budgets, str(png), max_tokens=6, llm=llm)
        lines = text.splitlines()
        assert lines[0].split()[0] == "budget" and [ln.split()[0] for ln in lines[1:3]] == ["0.5", "0.15"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png.read_bytes()[16:24])
        assert width > 300 and height > 200

        rows, per_request = measure_budgets(llm, reqs, budgets, max_tokens=6)
        assert [r.requests for r in rows] == [3, 3] and len(per_request) == 6
        hi, lo = rows
        assert 0 <= lo.retention < hi.retention < 1 and 0 < hi.flop_saving < lo.flop_saving < 1
        for r in rows:
            assert 0.0 <= r.agreement_p10 <= r.agreement_mean <= 1.0 and r.logprob_gap >= 0.0
        assert lo.agreement_mean < 1.0  # at 15% the tiny model's answers change: a check that can fail
        stats = llm.llm_engine.output_processor._v2drop_stats
        assert not stats.probe.watched and not stats.probe.shadows  # nothing kept after the run

        # request 0 at the lowest budget, from two separate runs on the same engine
        tok = AutoTokenizer.from_pretrained(model)
        content = reqs[0]["messages"][0]["content"]
        first = llm.chat(reqs[0]["messages"], SamplingParams(
            temperature=0.0, max_tokens=6, extra_args={"v2drop_target_retention": 0.15}), use_tqdm=False)[0]
        prompt, answer = list(first.prompt_token_ids), list(first.outputs[0].token_ids)
        forced = llm.generate({"prompt_token_ids": _unexpanded(tok, content) + answer,
                               "multi_modal_data": {"image": make_image("large", 41)}},
                              SamplingParams(max_tokens=1, prompt_logprobs=1, extra_args={"v2drop_off": True}),
                              use_tqdm=False)[0]
        assert list(forced.prompt_token_ids) == prompt + answer
        want = measure(answer, *rows_from_prompt_logprobs(forced.prompt_logprobs, answer, len(prompt)))
        got = per_request[(0.15, 0)]
        assert (got.tokens, got.agreement) == (want.tokens, want.agreement)
        assert got.logprob_gap == pytest.approx(want.logprob_gap, abs=1e-9)
    finally:
        shutdown_llm(llm)
