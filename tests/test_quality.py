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


# ------------------------------------------------------------------ the probe's bookkeeping
from vllm_v2drop.config import QualityProbeConfig  # noqa: E402
from vllm_v2drop.frontend.probe import ProbeSkip, QualityProbe  # noqa: E402

STOP, LENGTH, ABORT = 0, 1, 2


class Rows:
    """A prompt-logprobs tensor stand-in (``.shape``, slicing, ``.tolist()``)."""

    def __init__(self, rows):
        self.rows = rows
        self.shape = (len(rows), len(rows[0]) if rows else 0)

    def __getitem__(self, sl):
        return Rows(self.rows[sl])

    def tolist(self):
        return [list(r) for r in self.rows]


def out(rid, tokens=(), finish=None, plp=None):
    return SimpleNamespace(request_id=rid, new_token_ids=list(tokens), finish_reason=finish,
                           new_prompt_logprobs_tensors=plp)


def req(rid, n=4):
    return SimpleNamespace(request_id=rid, prompt_token_ids=list(range(n)), external_req_id=rid, resumable=False)


def make_probe(rate=1.0, max_in_flight=2, max_waiting=0, waiting=0, max_model_len=None, fail=None):
    sent = []

    def submit(template, answer):
        if fail:
            raise ProbeSkip(fail)
        sent.append((template, list(answer)))
        return f"{template}-shadow"

    p = QualityProbe(QualityProbeConfig(rate=rate, max_in_flight=max_in_flight, max_waiting=max_waiting),
                     template=lambda r: r.request_id, submit=submit, waiting=lambda: waiting,
                     normal_finishes=(STOP, LENGTH), max_model_len=max_model_len, collect=True)
    return p, sent


def consider(p, rid, pruned=True, choice=None, n=4):
    return p.consider(req(rid, n), pruned=pruned, choice=choice, modalities=["image"], retention=0.25)


def test_who_is_probed():
    p, _ = make_probe(rate=1.0)
    assert consider(p, "a") and not consider(p, "b", choice=False)
    assert not consider(p, "c", pruned=False) and consider(p, "d", pruned=False, choice=True)
    p0, _ = make_probe(rate=0.0)
    assert not consider(p0, "a") and consider(p0, "b", choice=True)


def test_answer_collected_to_the_end_then_one_shadow_then_nothing_kept():
    p, sent = make_probe()
    consider(p, "a", n=3)
    p.after_outputs([out("a", [7])])
    p.after_outputs([out("a", [8, 9], finish=LENGTH)])
    assert sent == [("a", [7, 8, 9])] and not p.watched and list(p.shadows) == ["a-shadow"]
    # prompt 0 1 2 + answer 7 8 9: rows for positions 1..5, in two chunks; answer rows are 2, 3, 4
    chunk1 = (Rows([[1, 1], [2, 5]]), Rows([[-0.1, -0.1], [-0.9, -0.2]]))
    chunk2 = (Rows([[7, 7], [8, 3], [9, 9]]), Rows([[-0.3, -0.3], [-2.0, -0.5], [-0.4, -0.4]]))
    rest = p.take_shadow_outputs([out("a-shadow", plp=chunk1), out("x")])
    assert [o.request_id for o in rest] == ["x"]
    p.take_shadow_outputs([out("a-shadow", [5], finish=LENGTH, plp=chunk2)])
    (r,) = p.results
    assert (r.tokens, r.agreement, r.logprob_gap) == (3, pytest.approx(2 / 3), pytest.approx(1.5 / 3))
    assert not p.shadows and not p.watched and p.totals["requests"] == 1 and p.totals["prompt_tokens"] == 6


def test_a_stop_string_ends_the_answer_and_it_is_probed():
    p, sent = make_probe()
    consider(p, "a")
    p.after_outputs([out("a", [7, 8])], stopped=["a"])
    assert sent == [("a", [7, 8])] and not p.watched


def test_aborted_and_failed_requests_are_never_probed():
    p, sent = make_probe()
    consider(p, "a")
    consider(p, "b")
    p.after_outputs([out("a", [7])])
    p.on_abort(["a"])
    p.after_outputs([out("a", [8], finish=LENGTH), out("b", [1], finish=ABORT)])
    assert sent == [] and not p.watched and p.totals["skipped"] == dict.fromkeys(p.totals["skipped"], 0)


@pytest.mark.parametrize("kw, reason", [
    (dict(max_in_flight=1), "in_flight"),
    (dict(max_waiting=2, waiting=3), "queue"),
    (dict(max_model_len=6), "too_long"),  # prompt 4 + answer 2 + 1 > 6
    (dict(fail="mm_cache"), "mm_cache"),
])
def test_skips_are_counted_by_reason(kw, reason):
    p, sent = make_probe(**kw)
    for rid in ("a", "b"):
        consider(p, rid)
    p.after_outputs([out("a", [7, 8], finish=STOP), out("b", [7, 8], finish=STOP)])
    skipped = p.totals["skipped"]
    assert skipped[reason] == (1 if reason == "in_flight" else 2)
    assert sum(skipped.values()) == skipped[reason] and len(sent) == 2 - skipped[reason]


def test_a_failed_shadow_counts_as_error():
    p, _ = make_probe()
    consider(p, "a")
    p.after_outputs([out("a", [7], finish=STOP)])
    p.take_shadow_outputs([out("a-shadow", finish=ABORT)])
    assert p.totals["skipped"]["error"] == 1 and p.totals["requests"] == 0 and not p.shadows


def test_a_shadow_that_never_answers_frees_its_slot(monkeypatch):
    p, sent = make_probe(max_in_flight=1)
    for rid in ("a", "b"):
        consider(p, rid)
    p.after_outputs([out("a", [7], finish=STOP)])
    monkeypatch.setattr(QualityProbe, "STALE_AFTER_S", -1.0)  # every running shadow is stale now
    p.after_outputs([out("b", [7], finish=STOP)])
    assert [t for t, _ in sent] == ["a", "b"] and list(p.shadows) == ["b-shadow"]
    assert p.totals["skipped"]["error"] == 1 and p.totals["skipped"]["in_flight"] == 0
