"""The KV audit's checks on a runner-shaped stand-in (no engine): a per_stage group of 4-row blocks.

The engine tests run every ``per_stage`` engine with the audit on (``V2DROP_AUDIT_KV=1`` in conftest);
these tests show that each check fires, with the request, stage and block named.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_v2drop.config import V2DropConfig
from vllm_v2drop.worker.audit import BlockAudit, V2DropAuditError
from vllm_v2drop.worker.runtime import BatchView, RequestView

BS, NUM_BLOCKS, PROMPT = 4, 16, 10


def runner(blocks_per_request: dict[str, list[int]], tokens: dict[str, list[int]]):
    """A stand-in for vLLM's V1 runner: one KV-cache group (stage 0, one layer), a block table per request."""
    kv = torch.zeros(NUM_BLOCKS, 1, BS, 2)
    spec = SimpleNamespace(stage=0, block_size=BS)
    table = np.zeros((len(blocks_per_request), 8), np.int32)
    for i, blocks in enumerate(blocks_per_request.values()):
        table[i, : len(blocks)] = blocks
    return SimpleNamespace(
        kv_cache_config=SimpleNamespace(num_blocks=NUM_BLOCKS, kv_cache_groups=[
            SimpleNamespace(kv_cache_spec=spec, layer_names=["layer0"])]),
        compilation_config=SimpleNamespace(static_forward_context={"layer0": SimpleNamespace(kv_cache=kv)}),
        input_batch=SimpleNamespace(block_table=[SimpleNamespace(
            block_table=SimpleNamespace(np=table), block_size=BS,
            num_blocks_per_row=np.asarray([len(b) for b in blocks_per_request.values()], np.int32))]),
        requests={r: SimpleNamespace(prompt_token_ids=t, output_token_ids=[], mm_features=[]) for r, t in tokens.items()},
        kv=kv,
    )


def step(audit, run, computed: dict[str, int], scheduled: dict[str, int]) -> None:
    views = {r: RequestView(r, PROMPT, [], False) for r in computed}
    batch = BatchView(list(computed), np.asarray(list(computed.values()), np.int64),
                      np.asarray(list(scheduled.values()), np.int64), views.__getitem__)
    schedule = V2DropConfig.from_additional_config({"v2drop": {"layers": [1], "keep_ratios": [0.5]}}).resolve(
        4, "Qwen2VLForConditionalGeneration")
    audit.after_step(run, schedule, batch)


def test_rows_past_the_allocated_blocks_stop_the_engine():
    run = runner({"a": [1, 2]}, {"a": list(range(PROMPT))})
    with pytest.raises(V2DropAuditError, match=r"request a holds 10 rows of stage 0 .* only 8 slots \(2 blocks\)"):
        step(BlockAudit(run), run, {"a": 0}, {"a": PROMPT})


def test_reuse_of_a_block_with_other_rows_stops_the_engine():
    prompt = list(range(PROMPT))
    run = runner({"a": [1, 2, 3]}, {"a": prompt})
    run.kv[1].fill_(1.0)
    run.kv[2].fill_(2.0)
    audit = BlockAudit(run)
    step(audit, run, {"a": 0}, {"a": PROMPT})  # fills blocks 1 and 2 (rows 0..7)
    # "b" shares a's first 8 tokens and resumes at 8 on a's blocks: what a prefix hit gives
    run.requests["b"] = SimpleNamespace(prompt_token_ids=prompt[:8] + [77, 78], output_token_ids=[], mm_features=[])
    run.input_batch.block_table[0].block_table.np[0, :3] = [1, 2, 4]
    step(audit, run, {"b": 8}, {"b": 2})  # the same rows: accepted
    # "c" differs in token 5 but is handed a's blocks: the first block's rows are fine, the second's are not
    run.requests["c"] = SimpleNamespace(prompt_token_ids=prompt[:5] + [99, 6, 7, 8, 9], output_token_ids=[],
                                        mm_features=[])
    run.input_batch.block_table[0].block_table.np[0, :3] = [1, 2, 5]
    with pytest.raises(V2DropAuditError, match=r"request c resumed at token 8 reuses block 2 .*stage 0, its block 1"):
        step(audit, run, {"c": 8}, {"c": 2})


def test_a_block_changed_after_it_filled_stops_the_engine():
    prompt = list(range(PROMPT))
    run = runner({"a": [1, 2, 3]}, {"a": prompt})
    audit = BlockAudit(run)
    step(audit, run, {"a": 0}, {"a": PROMPT})
    run.kv[2, 0, 1].fill_(5.0)  # overwritten while cached
    run.requests["b"] = SimpleNamespace(prompt_token_ids=prompt, output_token_ids=[], mm_features=[])
    with pytest.raises(V2DropAuditError, match="its rows changed after it was filled"):
        step(audit, run, {"b": 8}, {"b": 2})
