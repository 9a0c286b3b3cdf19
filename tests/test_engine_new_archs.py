"""Qwen3-VL (dense and MoE) and LLaVA-NeXT inside the real vLLM engine (CPU, tiny random models).

The same two oracles as ``test_engine.py`` (stock vLLM for identity, the transformers
reference for fidelity), with its helpers and requests: one image, two images, and a
video where the model takes one (Qwen3-VL's video placeholder mixes timestamp text rows
with embedding rows; only the latter are candidates). Per architecture two engines:
stock, and one V2Drop engine that serves the identity (requests that drop nothing), fidelity,
KV and batch tests. That engine runs ``kv_mode: per_stage`` (block size 32), so its KV test
checks both what each layer holds and the blocks each stage's group allocates; the
``shared`` mode's drop path is the same model code.

Qwen3-VL's schedule drops at layers 1 and 2, before the last DeepStack layer (the tiny
tower feeds layers 0, 1, 2): DeepStack features must then be added to the kept rows only.
"""

from __future__ import annotations

import math
import os

import pytest
from conftest import NEW_ARCHS, greedy
from test_engine import (  # noqa: F401 (model_dir, stock, stock_tokens, reference: fixtures, over this module's arch)
    HF_ARCH,
    generate_each,
    identity_xargs,
    mixed_batch,
    model_dir,
    read_trace,
    ref_request,
    ref_schedule,
    reference,
    requests,
    resolved,
    stock,
    stock_tokens,
    tokens,
    trace_for,
)

from vllm_v2drop.core.request_plan import plan_request

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # kv_probe runs in the worker

BLOCK = 32
DEEPSTACK_LAYERS = 3  # the tiny Qwen3-VL towers feed decoder layers 0, 1, 2
# Qwen3-VL: two drops inside the DeepStack layers; LLaVA-NeXT: its default (llava-1.5 scaled to 8 layers)
SCHEDULES = {
    "qwen3-vl": {"layers": [1, 2, 5], "keep_ratios": [0.5, 0.5, 0.25]},
    "qwen3-vl-moe": {"layers": [1, 2, 5], "keep_ratios": [0.5, 0.5, 0.25]},
    "llava-next": {},
}


def vision_requests(arch, model_dir) -> dict[str, dict]:
    return {k: v for k, v in requests(arch, model_dir).items() if k != "text"}


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=NEW_ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def v2drop(arch, model_dir, tmp_path_factory, engines):
    """The architecture's V2Drop engine: its schedule, per-stage KV groups, tracing on."""
    trace = tmp_path_factory.mktemp(f"trace-{arch}")
    config = {**SCHEDULES[arch], "kv_mode": "per_stage", "trace": str(trace)}
    llm = engines.get(model_dir, model_impl="v2drop", block_size=BLOCK, enable_prefix_caching=False,
                      additional_config={"v2drop": config})
    return llm, trace, config


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("how", ["v2drop_off", "keep_ratios-1.0"])
def test_identity_with_stock_vllm(arch, model_dir, stock_tokens, v2drop, how):
    """Nothing dropped (the request is off, or keeps every row at every layer): 32 greedy tokens equal
    stock vLLM's (image, two images, video, text), on the per_stage engine that prunes others."""
    llm, _, config = v2drop
    assert llm.llm_engine.model_config.architecture == "V2Drop" + HF_ARCH[arch]
    params = greedy(32, extra_args=identity_xargs(how, resolved(arch, config).layers))
    reqs = requests(arch, model_dir)
    got = {name: list(llm.generate([r], params, use_tqdm=False)[0].outputs[0].token_ids) for name, r in reqs.items()}
    assert got == stock_tokens


def test_schedule_drops_inside_deepstack(arch, reference, v2drop):
    """Qwen3-VL's tested schedule has its first drops before the last DeepStack layer."""
    _, _, config = v2drop
    layers = resolved(arch, config).layers
    if arch.startswith("qwen3"):
        ds = reference.model.config.vision_config.deepstack_visual_indexes
        assert len(ds) == DEEPSTACK_LAYERS and layers[0] < layers[1] <= DEEPSTACK_LAYERS - 1
    else:
        assert layers == (1, 4, 6)  # llava-1.5's 3, 17, 22 of 32 scaled to 8 layers


def test_fidelity_with_reference(arch, model_dir, v2drop, reference):
    """Kept rows per item per stage and 16 greedy tokens equal the transformers reference."""
    llm, trace_dir, config = v2drop
    schedule = ref_schedule(arch, config)
    reqs = vision_requests(arch, model_dir)
    outs = generate_each(llm, list(reqs.values()), 16)
    trace = read_trace(trace_dir)
    for (name, req), out in zip(reqs.items(), outs):
        ref = reference.generate([ref_request(req)], schedule, max_new_tokens=16)[0]
        assert list(out.prompt_token_ids) == ref.prompt_token_ids, name
        rec = trace_for(trace, out.request_id)
        assert [(it["first"], it["rows"]) for it in rec["items"]] == ref.items, name
        assert [it["kept"] for it in rec["items"]] == ref.kept, name
        assert all(len(k[-1]) < it["rows"] for it, k in zip(rec["items"], ref.kept)), name  # it dropped
        # candidates are embedding rows only (not the timestamp text rows of a Qwen3-VL video)
        ids, vision = out.prompt_token_ids, set(reference.vision_token_ids)
        assert all(ids[p] in vision for it in rec["items"] for p in it["kept"][0]), name
        assert list(out.outputs[0].token_ids) == ref.token_ids, name


def test_kv_rows_and_blocks_per_stage(arch, model_dir, v2drop, reference):
    """While a request decodes, layer l holds exactly the prompt rows present at layer l (plus the
    decoded tokens), and each stage's KV-cache group holds the plan's blocks:
    ceil((compact prompt length of the stage + decoded tokens) / block size)."""
    from vllm_v2drop.dev.kv_probe import kv_groups, request_kv_state, zero_kv_cache

    llm, _, config = v2drop
    schedule = ref_schedule(arch, config)
    groups = llm.collective_rpc(kv_groups)[0]
    assert sorted({g["stage"] or 0 for g in groups}) == list(range(len(schedule.layers) + 1))
    engine = llm.llm_engine
    for name, req in vision_requests(arch, model_dir).items():
        ref = reference.generate([ref_request(req)], schedule, max_new_tokens=1)[0]
        T = len(ref.prompt_token_ids)
        items = reference._items(ref.prompt_token_ids, ref_request(req))
        plan = plan_request(items, T, schedule.keep_ratios, schedule.min_keep)
        llm.collective_rpc(zero_kv_cache)
        rid = f"kv-{name}"
        engine.add_request(rid, req, greedy(64))
        state = None
        while state is None:  # the engine core runs on its own: probe once the prefill is done
            if any(len(o.outputs[0].token_ids) for o in engine.step()):
                state = llm.collective_rpc(request_kv_state, args=(rid,))[0]
        engine.abort_request([rid])
        while engine.has_unfinished_requests():
            engine.step()
        rows, blocks = state
        by_layer = [n for _, n in sorted(rows.items(), key=lambda kv: int(kv[0].split("layers.")[1].split(".")[0]))]
        decoded = by_layer[0] - T  # decode rows written so far (every layer has them)
        assert decoded >= 1 and [n - decoded for n in by_layer] == ref.kv_lengths, name
        planned = [math.ceil((plan.compact_len(g["stage"] or 0, T) + decoded) / BLOCK) for g in groups]
        assert [len(b) for b in blocks] == planned, name
        assert [plan.compact_len(s, T) for s in range(len(schedule.layers) + 1)] == sorted(
            set(ref.kv_lengths), reverse=True), name
        assert sum(planned) < len(groups) * math.ceil(T / BLOCK), name  # fewer blocks than stock


def test_batch_equals_alone(arch, model_dir, v2drop):
    """A mixed batch gives every request exactly the tokens it gets alone."""
    llm, _, _ = v2drop
    batch = mixed_batch(arch, model_dir)
    alone = tokens(generate_each(llm, batch, 24))
    together = tokens(llm.generate(batch, greedy(24), use_tqdm=False))
    assert together == alone
