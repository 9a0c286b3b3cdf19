"""The teacher-forced quality measure (``core/quality.py``) and the probe's settings (no engine)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_v2drop.config import V2DropConfig, V2DropConfigError
from vllm_v2drop.core.quality import (
    measure,
    modality_label,
    percentile,
    retention_bucket,
    rows_from_prompt_logprobs,
)
from vllm_v2drop.overrides import V2DropRequestError, parse, probe_choice

SCHED = V2DropConfig().resolve(8, "Qwen2VLForConditionalGeneration")


def test_every_token_top1_is_agreement_one_and_gap_zero():
    a = measure([5, 7, 9], [5, 7, 9], [-0.1, -2.0, -0.5], [-0.1, -2.0, -0.5])
    assert (a.tokens, a.agreed, a.agreement, a.logprob_gap) == (3, 3, 1.0, 0.0)


def test_no_token_top1_is_agreement_zero_and_mean_gap():
    a = measure([1, 2], [3, 4], [-0.5, -1.0], [-1.5, -4.0])
    assert (a.agreed, a.agreement) == (0, 0.0)
    assert a.logprob_gap == pytest.approx((1.0 + 3.0) / 2)


def test_partial_agreement_counts_only_disagreeing_rows_in_the_gap():
    a = measure([1, 2, 3, 4], [1, 9, 3, 9], [-0.2, -0.1, -0.3, -0.7], [-0.2, -1.1, -0.3, -0.9])
    assert a.agreement == 0.5
    assert a.logprob_gap == pytest.approx((1.0 + 0.2) / 4)


def test_a_tie_with_the_top1_is_agreement():
    a = measure([1], [2], [-0.7], [-0.7])
    assert (a.agreement, a.logprob_gap) == (1.0, 0.0)


def test_bad_rows_are_refused():
    with pytest.raises(ValueError):
        measure([], [], [], [])
    with pytest.raises(ValueError):
        measure([1, 2], [1], [0.0], [0.0])


def test_rows_from_vllm_prompt_logprobs():
    """Rows as ``RequestOutput.prompt_logprobs`` gives them (prompt_logprobs=1): the answer token
    and the top-1, one entry when they are the same token."""
    lp = lambda v, r: SimpleNamespace(logprob=v, rank=r)  # noqa: E731
    prompt_len = 3
    plp = [None, {11: lp(-1.0, 1)}, {12: lp(-2.0, 2), 40: lp(-0.5, 1)},  # prompt rows (ignored)
           {7: lp(-0.1, 1)},                                          # answer token 7: top-1
           {8: lp(-3.0, 4), 2: lp(-0.25, 1)}]                          # answer token 8: top-1 is 2
    top_ids, top_lps, ans_lps = rows_from_prompt_logprobs(plp, [7, 8], prompt_len)
    assert (top_ids, top_lps, ans_lps) == ([7, 2], [-0.1, -0.25], [-0.1, -3.0])
    a = measure([7, 8], top_ids, top_lps, ans_lps)
    assert (a.agreement, a.logprob_gap) == (0.5, pytest.approx(2.75 / 2))
    with pytest.raises(ValueError):
        rows_from_prompt_logprobs(plp, [7, 8], 2)


def test_labels_and_percentile():
    assert [retention_bucket(r) for r in (0.05, 0.1, 0.25, 0.3, 0.95, 1.0)] == ["0.1", "0.1", "0.3", "0.3", "<1", "1"]
    assert modality_label(["video", "image", "image"]) == "image+video"
    xs = [0.3, 1.0, 0.5, 0.9, 0.7]
    assert percentile(xs, 10) == pytest.approx(float(np.percentile(xs, 10)))
    assert math.isnan(percentile([], 10))


# ------------------------------------------------------------------------------- settings
def test_probe_config_defaults_off_and_validates():
    assert V2DropConfig().quality_probe is None
    p = V2DropConfig(quality_probe={"rate": 0.01, "max_in_flight": 4}).quality_probe
    assert (p.rate, p.max_in_flight, p.max_waiting) == (0.01, 4, 8)
    assert V2DropConfig.from_additional_config({"v2drop": {"quality_probe": {"rate": 1}}}).quality_probe.rate == 1.0


@pytest.mark.parametrize("value, field", [
    ({"rate": 1.5}, "quality_probe.rate"),
    ({"rate": -0.1}, "quality_probe.rate"),
    ({"rate": "0.1"}, "quality_probe.rate"),
    ({"max_in_flight": 0}, "quality_probe.max_in_flight"),
    ({"max_in_flight": 1.5}, "quality_probe.max_in_flight"),
    ({"max_waiting": -1}, "quality_probe.max_waiting"),
    ({"rate": 0.1, "sample": 3}, "quality_probe.sample"),
    (0.01, "quality_probe"),
])
def test_bad_probe_config_names_the_field(value, field):
    with pytest.raises(V2DropConfigError) as e:
        V2DropConfig(quality_probe=value)
    msg = str(e.value)
    assert msg.count(field) >= 1 and "allowed" in msg, msg


def test_probe_request_key():
    assert probe_choice({"v2drop_probe": True}, SCHED) is True
    assert probe_choice({"v2drop_probe": 0}, SCHED) is False
    assert probe_choice({"v2drop_off": True}, SCHED) is None
    assert probe_choice(None, SCHED) is None
    assert parse({"v2drop_probe": True}, SCHED) is not None  # a known key
    with pytest.raises(V2DropRequestError) as e:
        parse({"v2drop_probe": "yes"}, SCHED)
    assert e.value.key == "v2drop_probe"
