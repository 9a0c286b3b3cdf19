"""V2Drop inside the real vLLM engine (CPU backend, tiny random models).

Checked against two independent oracles: stock vLLM (every ratio 1.0, or metric
``none``, must give its tokens exactly) and the plain-transformers reference of
the spec (kept rows per item per stage, per-layer KV lengths, greedy tokens).
One engine per (architecture, configuration), shared by the tests of a module.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
from conftest import (
    ARCHS,
    NEW_VIDEO_ARCHS,
    VIDEO_ARCHS,
    greedy,
    make_image,
    make_video,
    mm_request,
    video_metadata,
)

from vllm_v2drop.config import V2DropConfig
from vllm_v2drop.dev.reference import RefRequest, RefSchedule, V2DropReference
from vllm_v2drop.dev.kv_probe import written_kv_rows, zero_kv_cache

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # kv_probe runs in the worker

HF_ARCH = {
    "llava": "LlavaForConditionalGeneration",
    "llava-onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3-vl": "Qwen3VLForConditionalGeneration",  # its own engine module: tests/test_engine_new_archs.py
    "qwen3-vl-moe": "Qwen3VLMoeForConditionalGeneration",
    "llava-next": "LlavaNextForConditionalGeneration",
}
TINY_DEPTH = 8
IDENTITY = {"layers": [1, 4, 6], "keep_ratios": [1.0, 1.0, 1.0]}


# --------------------------------------------------------------------------------- inputs


def requests(arch: str, model_dir) -> dict[str, dict]:
    """Named requests for ``arch``: one image, two images, a video where supported, text only."""
    reqs = {
        "image": mm_request(arch, model_dir, images=[make_image("wide", 1)]),
        "two-images": mm_request(arch, model_dir, images=[make_image("small", 2), make_image("large", 3)],
                                 text="Compare the two pictures."),
        "text": mm_request(arch, model_dir, text="Tell me a long story about a lighthouse keeper."),
    }
    if arch in VIDEO_ARCHS + NEW_VIDEO_ARCHS:
        # 4 frames on Qwen2.5-VL: transformers 5.19 starts the text after a longer video at the
        # wrong M-RoPE position (see stock_cases), so the reference could not match vLLM.
        frames = make_video(frames=4 if arch == "qwen2.5-vl" else 8, seed=4)
        reqs["video"] = mm_request(arch, model_dir, video=frames, text="What happens here?")
    return reqs


def mixed_batch(arch: str, model_dir) -> list[dict]:
    """At least 8 requests of every kind: sizes, a video, two images, text only, long text around an image."""
    long_text = " ".join(f"word{i}" for i in range(120))
    batch = [
        mm_request(arch, model_dir, images=[make_image("wide", 11)]),
        mm_request(arch, model_dir, images=[make_image("large", 12)], text="What is in the corner?"),
        mm_request(arch, model_dir, images=[make_image("small", 13), make_image("wide", 14)]),
        mm_request(arch, model_dir, text="Only text here, no picture at all."),
        mm_request(arch, model_dir, images=[make_image("small", 15)], text=long_text + " Now describe."),
        mm_request(arch, model_dir, text=long_text),
        mm_request(arch, model_dir, images=[make_image("large", 16)], text="Short."),
        mm_request(arch, model_dir, images=[make_image("wide", 17)], text="Describe. " + long_text),
    ]
    if arch in VIDEO_ARCHS + NEW_VIDEO_ARCHS:
        batch.append(mm_request(arch, model_dir, video=make_video(seed=18), text="Summarise the video."))
    return batch


def ref_request(req: dict) -> RefRequest:
    mm = req.get("multi_modal_data", {})
    images = mm.get("image", [])
    images = images if isinstance(images, list) else [images]
    video, meta = mm.get("video"), None
    if isinstance(video, tuple):  # (frames, metadata) for Qwen2.5-VL: the reference gets the same fps
        video, meta = video[0], video_metadata(video[0])
    return RefRequest(req["prompt"], images=images, videos=[] if video is None else [video],
                      video_metadata=None if meta is None else [meta])


def resolved(arch: str, config: dict):
    return V2DropConfig.from_additional_config({"v2drop": config}).resolve(TINY_DEPTH, HF_ARCH[arch])


def ref_schedule(arch: str, config: dict) -> RefSchedule:
    s = resolved(arch, config)
    return RefSchedule(list(s.layers), list(s.keep_ratios), s.min_keep, s.metric, s.seed)


def generate_each(llm, reqs: list[dict], max_tokens: int) -> list:
    """Each request alone (its own ``generate`` call)."""
    return [llm.generate([r], greedy(max_tokens), use_tqdm=False)[0] for r in reqs]


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def read_trace(trace_dir) -> dict[str, dict]:
    """Trace lines by the engine's request id prefix (vLLM appends a suffix to offline ids)."""
    out = {}
    for path in glob.glob(os.path.join(trace_dir, "*.jsonl")):
        for line in open(path):
            rec = json.loads(line)
            out[rec["request_id"]] = rec
    return out


def trace_for(trace: dict, request_id: str) -> dict:
    hits = [v for k, v in trace.items() if k == request_id or k.startswith(request_id + "-")]
    assert len(hits) == 1, f"expected one trace line for request {request_id}, got {len(hits)}"
    return hits[0]


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(arch, tiny_models):
    return tiny_models[arch]


@pytest.fixture(scope="module")
def stock(model_dir, engines):
    """Stock vLLM (no plugin model) on the architecture: the identity oracle."""
    return engines.get(model_dir)


@pytest.fixture(scope="module")
def stock_tokens(arch, model_dir, stock):
    """Stock vLLM on the named requests, 32 greedy tokens."""
    reqs = requests(arch, model_dir)
    return dict(zip(reqs, tokens(generate_each(stock, list(reqs.values()), 32))))


@pytest.fixture(scope="module")
def reference(model_dir):
    return V2DropReference(model_dir)


@pytest.fixture(scope="module")
def paper(arch, model_dir, tmp_path_factory, engines):
    """V2Drop with the architecture's default (paper) schedule scaled to the tiny depth, tracing on."""
    trace = tmp_path_factory.mktemp(f"trace-{arch}")
    config = {"trace": str(trace)}
    return engines.get(model_dir, model_impl="v2drop", additional_config={"v2drop": config}), trace, config


# ---------------------------------------------------------------------------------- tests


def identity_xargs(how: str, layers) -> dict:
    """Per-request settings under which a V2Drop engine must give stock vLLM's tokens."""
    return {"v2drop_off": True} if how == "v2drop_off" else {"v2drop_keep_ratios": [1.0] * len(layers)}


@pytest.mark.parametrize("how", ["v2drop_off", "keep_ratios-1.0"])
def test_identity_with_stock_vllm(arch, model_dir, stock_tokens, paper, how):
    """Nothing dropped (the request is off, or keeps every row at every layer): token for token what
    stock vLLM generates (image, two images, video, text), on the V2Drop engine that prunes others."""
    llm, _, config = paper
    assert llm.llm_engine.model_config.architecture == "V2Drop" + HF_ARCH[arch]
    params = greedy(32, extra_args=identity_xargs(how, resolved(arch, config).layers))
    reqs = requests(arch, model_dir)
    got = {name: list(llm.generate([r], params, use_tqdm=False)[0].outputs[0].token_ids) for name, r in reqs.items()}
    assert got == stock_tokens


def test_fidelity_with_reference(arch, model_dir, paper, reference):
    """Kept rows per item per stage and 16 greedy tokens equal the transformers reference."""
    llm, trace_dir, config = paper
    schedule = ref_schedule(arch, config)
    assert schedule.layers, "the default schedule must drop something on the tiny depth"
    reqs = {k: v for k, v in requests(arch, model_dir).items() if k != "text"}
    outs = generate_each(llm, list(reqs.values()), 16)
    trace = read_trace(trace_dir)
    for (name, req), out in zip(reqs.items(), outs):
        ref = reference.generate([ref_request(req)], schedule, max_new_tokens=16)[0]
        assert list(out.prompt_token_ids) == ref.prompt_token_ids, name
        rec = trace_for(trace, out.request_id)
        assert [(it["first"], it["rows"]) for it in rec["items"]] == ref.items, name
        assert [it["kept"] for it in rec["items"]] == ref.kept, name
        assert list(out.outputs[0].token_ids) == ref.token_ids, name


def test_kv_cache_holds_planned_rows(arch, model_dir, paper, reference):
    """After a prefill, layer l's KV cache holds exactly the prompt rows present at layer l."""
    llm, _, config = paper
    req = requests(arch, model_dir)["two-images"]
    llm.collective_rpc(zero_kv_cache)
    out = llm.generate([req], greedy(1), use_tqdm=False)[0]  # one token: only the prompt is written
    rows = list(llm.collective_rpc(written_kv_rows)[0].values())
    ref = reference.generate([ref_request(req)], ref_schedule(arch, config), max_new_tokens=1)[0]
    assert rows == ref.kv_lengths
    assert rows[0] == len(out.prompt_token_ids) and rows[-1] < rows[0]


def test_batch_equals_alone(arch, model_dir, paper):
    """A mixed batch gives every request exactly the tokens it gets alone."""
    llm, _, _ = paper
    batch = mixed_batch(arch, model_dir)
    assert len(batch) >= 8
    alone = tokens(generate_each(llm, batch, 24))
    together = tokens(llm.generate(batch, greedy(24), use_tqdm=False))
    assert together == alone


def test_trace_format(arch, model_dir, paper):
    llm, trace_dir, config = paper
    out = llm.generate([requests(arch, model_dir)["two-images"]], greedy(2), use_tqdm=False)[0]
    rec = trace_for(read_trace(trace_dir), out.request_id)
    layers = list(resolved(arch, config).layers)
    assert rec["layers"] == layers
    assert [it["modality"] for it in rec["items"]] == ["image", "image"]
    for it in rec["items"]:
        assert len(it["kept"]) == len(layers)
        rows = set(range(it["first"], it["first"] + it["rows"]))
        for before, after in zip([sorted(rows)] + it["kept"], it["kept"]):
            assert set(after) <= set(before) and after == sorted(after) and len(after) >= 1


def test_prompt_logprobs_request_is_not_pruned(arch, model_dir, paper, stock_tokens):
    """The spec exempts requests that ask for prompt logprobs: they get stock vLLM's tokens."""
    llm, trace_dir, _ = paper
    out = llm.generate([requests(arch, model_dir)["image"]], greedy(32, prompt_logprobs=1), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == stock_tokens["image"]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    rec = trace_for(read_trace(trace_dir), out.request_id)
    assert all(len(kept) == it["rows"] for it in rec["items"] for kept in it["kept"])


# ------------------------------------------------------------------ stock vLLM itself (the oracle)


def stock_cases(arch: str, model_dir) -> dict[str, dict]:
    """One small image, two images, and a video where the model takes one."""
    cases = {"image": mm_request(arch, model_dir, images=[make_image("small")]),
             "two-images": mm_request(arch, model_dir, images=[make_image("wide", 1), make_image("large", 2)])}
    if arch in VIDEO_ARCHS:
        # transformers 5.19's Qwen2.5-VL get_rope_index advances text positions after a video by
        # max(h, w) only, where vLLM (and the original Qwen code) use max(position) + 1; they agree
        # while 2 * (grid_t - 1) < max(h, w), so the comparison video for Qwen2.5-VL has 4 frames.
        cases["video"] = mm_request(arch, model_dir, video=make_video(frames=4 if arch == "qwen2.5-vl" else 8))
    return cases


@pytest.fixture(scope="module")
def stock_runs(arch, model_dir, stock):
    """The stock cases generated twice in one batch each, 16 greedy tokens."""
    cases = stock_cases(arch, model_dir)
    runs = [tokens(stock.generate(list(cases.values()), greedy(16), use_tqdm=False)) for _ in range(2)]
    return [dict(zip(cases, run)) for run in runs]


def test_stock_deterministic(stock_runs):
    first, second = stock_runs
    assert first == second
    for name, toks in first.items():
        assert len(toks) == 16, name
        assert len(set(toks)) > 2, (name, toks)  # not one token repeated
    assert len({tuple(t) for t in first.values()}) == len(first)  # the inputs matter


def test_stock_matches_transformers(arch, model_dir, stock_runs):
    """Greedy float32 tokens from stock vLLM and from transformers' ``generate`` match: both read the
    same weights, processor and chat template."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    # eos_token_id=[]: never stop and never suppress EOS, like vLLM's ignore_eos (None would fall
    # back to the model's EOS and stop; min_new_tokens would mask EOS out of the argmax).
    gen = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=[], pad_token_id=proc.tokenizer.pad_token_id)
    for name, req in stock_cases(arch, model_dir).items():
        ref = ref_request(req)
        kw: dict = {"images": list(ref.images)} if ref.images else {}
        if ref.videos:
            kw["videos"] = list(ref.videos)
            if arch.startswith("qwen"):
                kw.update(video_metadata=[video_metadata(ref.videos[0])], do_sample_frames=False)
        inputs = proc(text=[req["prompt"]], return_tensors="pt", **kw)
        with torch.no_grad():
            out = model.generate(**inputs, generation_config=gen)
        assert out[0, inputs["input_ids"].shape[1]:].tolist() == stock_runs[0][name], name
