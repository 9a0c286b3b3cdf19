"""The plain-transformers V2Drop reference (the oracle the engine is checked against).

No vLLM here: these tests pin the reference itself against the models' own
``generate`` and against counts worked out by hand.
"""

from __future__ import annotations

import ast
import math
import pathlib

import numpy as np
import pytest
import torch

from vllm_v2drop.dev.reference import (
    RefRequest,
    RefSchedule,
    V2DropReference,
    find_vision_runs,
    keep_count,
    random_score,
)

ARCHS = ("llava", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "llava-next")
VIDEO_ARCHS = ("llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe")
# LLaVA-1.5's schedule (layers 3, 17, 22 of 32) scaled to the tiny depth 8: round(l * 8 / 32) made
# strictly increasing -> 3 -> 1, 17 -> 4, 22 -> 6 (5.5 rounds up to 6).
TINY_LAYERS = [1, 4, 6]
TINY_RATIOS = [0.5, 0.5, 0.0]
NEW_TOKENS = 16

# ------------------------------------------------------------------------------------ local helpers


def _image(seed: int, w: int = 64, h: int = 64):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def _video(seed: int, frames: int = 4, size: int = 64) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (frames, size, size, 3), dtype=np.uint8)


def _prompt(arch: str, n_images: int = 0, n_videos: int = 0, text: str = "describe what you see") -> str:
    """A prompt with the model's placeholders, in the style of each model's chat template."""
    if arch in ("llava", "llava-next"):
        return "USER: " + "<image>\n" * n_images + text + " ASSISTANT:"
    if arch == "llava-onevision":
        vis = "<image>" * n_images + "<video>" * n_videos
        return "<|im_start|>user " + vis + "\n" + text + "<|im_end|>\n<|im_start|>assistant\n"
    vis = ("<|vision_start|><|image_pad|><|vision_end|>" * n_images
           + "<|vision_start|><|video_pad|><|vision_end|>" * n_videos)
    return "<|im_start|>user\n" + vis + text + "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def model_dirs(request, tmp_path_factory):
    """The session's tiny models when tests/conftest.py provides them, else built here."""
    try:
        return request.getfixturevalue("tiny_models")
    except pytest.FixtureLookupError:
        from vllm_v2drop.dev.make_model import make_model

        root = tmp_path_factory.mktemp("ref_models")
        return {a: make_model(a, root / a) for a in ARCHS}


_REFS: dict = {}


@pytest.fixture(scope="module")
def refs(model_dirs):
    def get(arch: str) -> V2DropReference:
        if arch not in _REFS:
            _REFS[arch] = V2DropReference(model_dirs[arch])
        return _REFS[arch]

    yield get
    _REFS.clear()


def _hf_generate(ref: V2DropReference, req: RefRequest, n: int) -> list[int]:
    """The model's own greedy ``generate``, float32, exactly ``n`` tokens (no EOS stop)."""
    inputs = ref._process(req)
    cfg = ref.model.generation_config
    cfg = type(cfg).from_dict(cfg.to_dict())
    cfg.update(do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None, num_beams=1)
    if cfg.pad_token_id is None:
        cfg.pad_token_id = 0
    with torch.no_grad():
        out = ref.model.generate(**inputs, generation_config=cfg)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _request(arch: str, kind: str) -> RefRequest:
    if kind == "image":
        return RefRequest(_prompt(arch, n_images=1), images=[_image(0, 80, 60)])
    if kind == "two-images":
        return RefRequest(_prompt(arch, n_images=2), images=[_image(1), _image(2, 48, 96)])
    return RefRequest(_prompt(arch, n_videos=1), videos=[_video(3)])


# ------------------------------------------------------------------------------------ pure pieces


def test_reference_is_independent_of_the_code_under_test():
    src = pathlib.Path(__file__).resolve().parents[1] / "vllm_v2drop" / "dev" / "reference.py"
    mods = set()
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mods.add(node.module or "")
    assert not any(m == "vllm" or m.startswith("vllm.") for m in mods)
    assert not any(m.startswith("vllm_v2drop.core") for m in mods)  # its own counts, scores and top-k
    assert all(not m.startswith("vllm_v2drop") or m == "vllm_v2drop.dev.reference" for m in mods)


def test_keep_count_formula():
    assert [keep_count(576, r, 1) for r in (0.5, 0.25, 0.0)] == [288, 144, 1]
    assert keep_count(288, 0.5, 1) == 144 and keep_count(144, 0.0, 1) == 1
    assert keep_count(100, 0.29, 1) == 29  # 0.29 * 100 == 28.999999999999996: the 1e-9 rescues it
    assert keep_count(0, 0.5, 1) == 0  # never more than there is
    assert keep_count(3, 0.1, 5) == 3
    assert keep_count(10, 1.0, 1) == 10


def test_random_score_hash():
    # the formula, spelled out once more
    def h(seed, stage, idx):
        x = (seed * 0x9E3779B1 + stage * 0x85EBCA77 + idx * 0xC2B2AE3D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
        x ^= x >> 12
        x = (x * 0x297A2D39) & 0xFFFFFFFF
        x ^= x >> 15
        return (x & 0xFFFFFF) / 2**24

    for seed, stage, idx in [(0, 1, 0), (0, 1, 5), (7, 3, 123456), (2**31, 2, 99)]:
        assert random_score(seed, stage, idx) == h(seed, stage, idx)
        assert 0.0 <= random_score(seed, stage, idx) < 1.0
    assert random_score(0, 0, 0) == 0.0
    assert len({random_score(0, 1, i) for i in range(1000)}) > 990


def test_find_vision_runs():
    assert find_vision_runs([1, 9, 9, 2, 8, 8, 8, 9, 3], [9, 8]) == [(1, 2), (4, 3), (7, 1)]
    assert find_vision_runs([9, 9], [9]) == [(0, 2)]
    assert find_vision_runs([1, 2], [9]) == []


def test_schedule_validation():
    RefSchedule([1, 4, 6], [0.5, 0.5, 0.0]).validate(8)
    for bad in (RefSchedule([0, 4], [0.5, 0.5]), RefSchedule([4, 4], [0.5, 0.5]), RefSchedule([8], [0.5]),
                RefSchedule([1], [1.5]), RefSchedule([1, 2], [0.5]), RefSchedule([1], [0.5], metric="foo")):
        with pytest.raises(ValueError):
            bad.validate(8)


# ------------------------------------------------------------------------------------ vs. the model


CASES = [(a, "image") for a in ARCHS] + [(a, "video") for a in VIDEO_ARCHS] + [(a, "two-images") for a in ARCHS]


@pytest.mark.parametrize("arch,kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_no_drop_equals_model_generate(refs, arch, kind):
    ref = refs(arch)
    req = _request(arch, kind)
    expected = _hf_generate(ref, req, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS
    (plain,) = ref.generate([req], None, NEW_TOKENS)
    (ones,) = ref.generate([req], RefSchedule(TINY_LAYERS, [1.0, 1.0, 1.0]), NEW_TOKENS)
    assert plain.token_ids == expected
    assert ones.token_ids == expected
    T = len(plain.prompt_token_ids)
    assert plain.kv_lengths == [T] * ref.num_layers == ones.kv_lengths
    n_items = 2 if kind == "two-images" else 1
    assert len(plain.items) == n_items
    ids, vision = plain.prompt_token_ids, set(ref.vision_token_ids)
    for (start, n0), stages in zip(ones.items, ones.kept):
        # an item's rows: its first n0 vision rows (contiguous, except Qwen3-VL videos: see below)
        assert stages == [[p for p in range(start, T) if ids[p] in vision][:n0]] * 3
    if kind == "video" and arch.startswith("qwen3"):
        # one item over one run per temporal patch; the timestamp text rows between runs are not candidates
        runs = find_vision_runs(ids, [ref.video_token_id])
        assert len(runs) > 1 and plain.items == [(runs[0][0], sum(n for _, n in runs))]


# ------------------------------------------------------------------------------------ dropping


def _check_kept(res, ratios, min_keep=1):
    for (start, n0), stages in zip(res.items, res.kept):
        assert len(stages) == len(ratios)
        prev = list(range(start, start + n0))
        for ratio, k in zip(ratios, stages):
            assert k == sorted(set(k)), "kept rows are sorted and distinct"
            assert set(k) <= set(prev), "stages are nested"
            assert len(k) == min(len(prev), max(min_keep, math.floor(ratio * len(prev) + 1e-9)))
            prev = k


def test_llava_schedule_kv_lengths_by_hand(refs):
    ref = refs("llava")
    (res,) = ref.generate([_request("llava", "image")], RefSchedule(TINY_LAYERS, TINY_RATIOS), 4)
    T = len(res.prompt_token_ids)
    # tiny LLaVA-1.5: a 64x64 CLIP input with 8x8 patches -> 64 image rows; the rest are text rows
    assert len(res.items) == 1 and res.items[0][1] == 64
    text = T - 64
    # layers 0: 64 rows; 1-3: 64 // 2 = 32; 4-5: 32 // 2 = 16; 6-7: max(1, 0) = 1
    assert res.kv_lengths == [text + 64] + [text + 32] * 3 + [text + 16] * 2 + [text + 1] * 2
    assert [len(k) for k in res.kept[0]] == [32, 16, 1]
    _check_kept(res, TINY_RATIOS)


@pytest.mark.parametrize(
    "arch,kind", [("llava-onevision", "two-images"), ("qwen2-vl", "video"), ("qwen2.5-vl", "two-images")]
)
def test_schedule_counts_per_layer(refs, arch, kind):
    ref = refs(arch)
    (res,) = ref.generate([_request(arch, kind)], RefSchedule(TINY_LAYERS, TINY_RATIOS), 4)
    T = len(res.prompt_token_ids)
    ns = [n0 for _, n0 in res.items]
    text = T - sum(ns)
    after = [[n // 2, n // 2 // 2, 1] for n in ns]  # 0.5, 0.5, 0.0 with min_keep 1
    expected = [
        text + sum(ns),
        *[text + sum(a[0] for a in after)] * 3,
        *[text + sum(a[1] for a in after)] * 2,
        *[text + sum(a[2] for a in after)] * 2,
    ]
    assert res.kv_lengths == expected
    _check_kept(res, TINY_RATIOS)
    # vision rows are exactly the items' rows: item runs hold only vision-token ids
    vision = {ref.image_token_id, ref.video_token_id}
    for start, n0 in res.items:
        assert all(t in vision for t in res.prompt_token_ids[start:start + n0])


def test_llava_onevision_adjacent_images_are_two_items(refs):
    ref = refs("llava-onevision")
    req = _request("llava-onevision", "two-images")
    (res,) = ref.generate([req], RefSchedule(TINY_LAYERS, TINY_RATIOS), 1)
    # the two placeholders are adjacent: one run of image tokens, split into the two images' rows
    runs = find_vision_runs(res.prompt_token_ids, [ref.image_token_id])
    assert len(runs) == 1
    (s0, n0), (s1, n1) = res.items
    assert s1 == s0 + n0 and runs[0] == (s0, n0 + n1)
    assert n0 == ref._rows_of_one("image", req.images[0]) and n1 == ref._rows_of_one("image", req.images[1])
    assert n0 != n1  # different aspect ratios -> different any-res tilings


def test_drop_changes_output_and_other_metrics(refs):
    ref = refs("qwen2-vl")
    req = _request("qwen2-vl", "video")
    results = {m: ref.generate([req], RefSchedule(TINY_LAYERS, TINY_RATIOS, metric=m), 4)[0]
               for m in ("l2", "l1", "cosine", "random", "none")}
    for m in ("l2", "l1", "cosine", "random"):
        _check_kept(results[m], TINY_RATIOS)
    (plain,) = ref.generate([req], None, 4)
    assert results["none"].token_ids == plain.token_ids
    assert results["none"].kv_lengths == plain.kv_lengths
    assert results["l2"].kv_lengths == results["random"].kv_lengths != plain.kv_lengths
    assert results["l2"].kept != results["cosine"].kept


def test_random_metric_is_seeded(refs):
    ref = refs("llava")
    req = _request("llava", "image")
    a = ref.generate([req], RefSchedule(TINY_LAYERS, TINY_RATIOS, metric="random", seed=0), 2)[0]
    b = ref.generate([req], RefSchedule(TINY_LAYERS, TINY_RATIOS, metric="random", seed=0), 2)[0]
    c = ref.generate([req], RefSchedule(TINY_LAYERS, TINY_RATIOS, metric="random", seed=1), 2)[0]
    assert a.kept == b.kept and a.token_ids == b.token_ids
    assert a.kept != c.kept
    # the first stage keeps the rows with the largest hash scores, ties to the lower index
    start, n0 = a.items[0]
    cand = list(range(start, start + n0))
    best = sorted(cand, key=lambda p: (-random_score(0, 1, p), p))[: n0 // 2]
    assert a.kept[0][0] == sorted(best)


def test_batch_equals_single_requests(refs):
    ref = refs("qwen2.5-vl")
    reqs = [_request("qwen2.5-vl", "image"), _request("qwen2.5-vl", "video")]
    sched = RefSchedule(TINY_LAYERS, TINY_RATIOS)
    batch = ref.generate(reqs, sched, 6)
    singles = [ref.generate([r], sched, 6)[0] for r in reqs]
    assert batch == singles
    assert batch[0].prompt_token_ids != batch[1].prompt_token_ids


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl", "qwen3-vl"])
def test_compaction_equals_masking(refs, arch):
    """Dropping rows == keeping every row but hiding the dropped ones as keys from their stage on.

    An independent formulation of steps 3-5 of the spec, with no KV cache at all: every step
    recomputes the whole sequence (prompt + tokens generated so far) through all layers, with the
    ORIGINAL positions (generated token t at ``T + t + rope_delta``), and layer l's mask hides, from
    every query, the prompt rows dropped at or before layer l. Its logits must match the reference's
    at every step. Qwen3-VL: DeepStack features are added to every vision row after layers
    0-2 (TINY_LAYERS drop at layer 1, before the last of them); rows hidden from then on do
    not matter.
    """
    steps = 4
    ref = refs(arch)
    req = _request(arch, "image")
    seen = []
    orig = ref._logits
    ref._logits = lambda h: seen.append(orig(h)) or seen[-1]
    try:
        (res,) = ref.generate([req], RefSchedule(TINY_LAYERS, TINY_RATIOS), steps)
    finally:
        del ref._logits
    embeds, pos, delta, deepstack = ref._embed(ref._process(req))
    assert len(deepstack) == (3 if arch == "qwen3-vl" else 0)
    T = embeds.shape[0]
    start, n0 = res.items[0]
    # dropped_at[p] = the layer from which prompt row p is hidden
    dropped_at = {}
    for layer, kept in zip(TINY_LAYERS, res.kept[0]):
        for p in range(start, start + n0):
            if p not in kept and p not in dropped_at:
                dropped_at[p] = layer
    embed = ref.model.get_input_embeddings()
    for step in range(steps):
        gen = res.token_ids[:step]
        x = torch.cat([embeds, embed(torch.tensor(gen, dtype=torch.long))]).unsqueeze(0) if gen else embeds.unsqueeze(0)
        n = x.shape[1]
        gpos = torch.arange(T, n) + delta
        p_all = torch.cat([pos, gpos.view(1, 1, -1).expand(3, 1, -1) if pos.dim() == 3 else gpos.view(1, -1)], dim=-1)
        neg = torch.finfo(x.dtype).min
        with torch.no_grad():
            for layer in range(ref.num_layers):
                alive = torch.ones(n, dtype=torch.bool)
                for p, at in dropped_at.items():
                    if layer >= at:
                        alive[p] = False
                allowed = torch.ones(n, n, dtype=torch.bool).tril() & alive.view(1, n)
                mask = torch.zeros(n, n).masked_fill(~allowed, neg).view(1, 1, n, n)
                x = ref.layers[layer](x, attention_mask=mask, position_embeddings=ref.lm.rotary_emb(x, p_all),
                                      position_ids=None, past_key_values=None, use_cache=False)
                if isinstance(x, tuple):
                    x = x[0]
                if layer < len(deepstack):
                    x = x + torch.cat([deepstack[layer], deepstack[layer].new_zeros(n - T, x.shape[-1])])
            logits = ref.model.lm_head(ref.lm.norm(x[:, -1:]))[0, -1]
        assert int(torch.argmax(logits)) == res.token_ids[step]
        torch.testing.assert_close(logits, seen[step], rtol=1e-4, atol=1e-4)
    assert T - len(dropped_at) == res.kv_lengths[-1]


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl"])
def test_text_only_and_prompt_ending_in_an_image(refs, arch):
    ref = refs(arch)
    sched = RefSchedule(TINY_LAYERS, TINY_RATIOS)
    text = RefRequest(_prompt(arch, text="tell me about the sky"))
    (a,) = ref.generate([text], sched, 4)
    assert a.items == [] and a.kept == [] and a.kv_lengths == [len(a.prompt_token_ids)] * ref.num_layers
    assert a.token_ids == _hf_generate(ref, text, 4)
    # the last prompt row is never a candidate, even when it is a vision row
    ph = "<image>" if arch == "llava" else "<|image_pad|>"
    (b,) = ref.generate([RefRequest("describe " + ph, images=[_image(5)])], sched, 2)
    T = len(b.prompt_token_ids)
    start, n0 = b.items[0]
    assert b.prompt_token_ids[-1] == ref.image_token_id and start + n0 == T - 1
    assert all(T - 1 not in k for k in b.kept[0])
    assert b.kv_lengths[-1] == T - n0 + 1
