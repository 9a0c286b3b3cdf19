"""The live quality probe through the real server, the ``openai`` client and ``/metrics``.

One offline engine first computes the reference the issue asks for, from two separate runs per
request: the pruned answer (``LLM.chat``), then the unpruned model teacher-forced on it
(``v2drop_off``, ``prompt_logprobs=1``, the prompt's token ids followed by the answer's). Then
one ``vllm serve --model-impl v2drop`` on the same tiny Qwen2-VL with the probe on (rate 1.0,
at most 2 shadows at once) serves every test, which reads the probe's numbers from ``/metrics``
over HTTP. vLLM's dev endpoints (``/pause``, ``/resume``) line requests up for the in-flight
limit.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import llm_engine, make_image
from test_request_serving import data_url, metric, post, scrape

from vllm_v2drop.core.quality import measure, rows_from_prompt_logprobs

pytestmark = pytest.mark.slow
ARCH = "qwen2-vl"  # the module's tiny model (conftest's model_dir)
openai = pytest.importorskip("openai")

MAX_TOKENS = 8
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=2048, seed=0, max_num_batched_tokens=4096,
              limit_mm_per_prompt={"image": 2})
PROBE = {"rate": 1.0, "max_in_flight": 2, "max_waiting": 64}
SERVER_ARGS = [
    "--model-impl", "v2drop", "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048", "--seed", "0",
    "--max-num-batched-tokens", "4096", "--kv-cache-memory-bytes", str(128 << 20),
    "--limit-mm-per-prompt", json.dumps({"image": 2}),
    "--additional-config", json.dumps({"v2drop": {"quality_probe": PROBE}}),
]

IMG1, IMG2, IMG3 = make_image("large", 31), make_image("wide", 32), make_image("small", 33)
QUESTION = "What is in this image?"
IMAGE = [{"type": "image_url", "image_url": {"url": data_url(IMG1)}}, {"type": "text", "text": QUESTION}]
TWO = [{"type": "image_url", "image_url": {"url": data_url(IMG2)}},
       {"type": "image_url", "image_url": {"url": data_url(IMG3)}}, {"type": "text", "text": "Compare them."}]
#: (name, content, images, vllm_xargs): pruned requests whose probe must equal the offline reference
CASES = [
    ("default", IMAGE, [IMG1], {}),
    ("target_0.2", IMAGE, [IMG1], {"v2drop_target_retention": 0.2}),
    ("two_images", TWO, [IMG2, IMG3], {"v2drop_keep_ratios": [0.5, 0.3, 0.0]}),
]


def _unexpanded(tokenizer, content) -> list[int]:
    """The chat prompt's token ids before vLLM expands each image placeholder into its rows."""
    parts = [{"type": "image"} if p["type"] == "image_url" else p for p in content]
    text = tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def reference(model_dir):
    """name -> {prompt, answer, agreement, gap, stop}: two offline runs per request (no probe)."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    with llm_engine(model_dir, model_impl="v2drop", **ENGINE) as llm:
        def two_runs(name, content, images, xargs, stop=None):
            sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=stop,
                                extra_args=xargs or None)
            first = llm.chat([{"role": "user", "content": content}], sp, use_tqdm=False)[0]
            prompt, answer = list(first.prompt_token_ids), list(first.outputs[0].token_ids)
            mm = {"image": images[0] if len(images) == 1 else images}
            forced = llm.generate({"prompt_token_ids": _unexpanded(tok, content) + answer, "multi_modal_data": mm},
                                  SamplingParams(max_tokens=1, prompt_logprobs=1, extra_args={"v2drop_off": True}),
                                  use_tqdm=False)[0]
            assert list(forced.prompt_token_ids) == prompt + answer  # the same prompt, the answer after it
            a = measure(answer, *rows_from_prompt_logprobs(forced.prompt_logprobs, answer, len(prompt)))
            out[name] = dict(prompt=prompt, answer=answer, agreement=a.agreement, gap=a.logprob_gap, stop=stop)

        for case in CASES:
            two_runs(*case)
        # a stop string: the answer ends where the text first shows the 5th token's piece
        piece = tok.decode(out["default"]["answer"][4:5])
        assert piece.strip()
        two_runs("stop", IMAGE, [IMG1], {}, stop=[piece])
    assert 0 < len(out["stop"]["answer"]) < MAX_TOKENS
    assert min(r["agreement"] for r in out.values()) < 1.0  # pruning changed something: a check that can fail
    return out


@pytest.fixture(scope="module")
def server(model_dir, reference, tmp_path_factory):
    from vllm_v2drop.dev.server import serve

    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve(model_dir, SERVER_ARGS, env={"VLLM_SERVER_DEV_MODE": "1"}, log_path=log) as url:
        yield url, str(model_dir)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="EMPTY", max_retries=0, timeout=120)


# ------------------------------------------------------------------------------------ helpers
def ask(client, model, content, xargs=None, max_tokens=MAX_TOKENS, stop=None):
    body = {"ignore_eos": True, "return_token_ids": True}
    if xargs:
        body["vllm_xargs"] = xargs
    resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, temperature=0.0, stop=stop, extra_body=body)
    return list(resp.choices[0].model_extra["token_ids"])


class Probe:
    """The probe's numbers in ``/metrics`` (summed over labels), read over HTTP."""

    NAMES = {"requests": "vllm:v2drop_probe_requests_total", "agreement": "vllm:v2drop_probe_agreement_sum",
             "gap": "vllm:v2drop_probe_logprob_gap_sum", "count": "vllm:v2drop_probe_agreement_count",
             "probe_tokens": "vllm:v2drop_probe_prompt_tokens_total", "client_tokens": "vllm:prompt_tokens_total"}

    def __init__(self, url):
        self.url = url
        self.before = self.read()

    def read(self) -> dict:
        text = scrape(self.url)
        out = {k: metric(text, name) for k, name in self.NAMES.items()}
        for reason in ("in_flight", "queue", "too_long", "mm_cache", "error"):
            out[reason] = metric(text, "vllm:v2drop_probe_skipped_total", reason=reason)
        out["watched"] = metric(text, "vllm:v2drop_probe_watched")
        out["shadows"] = metric(text, "vllm:v2drop_probe_in_flight")
        out["text"] = text
        return out

    def settled(self, timeout: float = 120.0, accounted: int | None = None) -> dict:
        """Deltas since construction, once no request is followed and no shadow runs (and, with
        ``accounted``, once that many requests were probed or skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.read()
            d = {k: v - self.before[k] for k, v in now.items() if k != "text"} | {"text": now["text"]}
            if now["watched"] == 0 and now["shadows"] == 0 and (
                    accounted is None or d["requests"] + skipped(d) >= accounted):
                return d
            assert time.monotonic() < deadline, ("the probe did not settle", {k: v for k, v in d.items()
                                                                                if k != "text"})
            time.sleep(0.2)  # polling /metrics, not a synchronisation


def skipped(d) -> float:
    return sum(d[r] for r in ("in_flight", "queue", "too_long", "mm_cache", "error"))


# -------------------------------------------------------------------------------------- tests
def test_startup_log_and_metrics_present(server):
    text = scrape(server[0])
    for name in ("vllm:v2drop_probe_requests_total", "vllm:v2drop_probe_skipped_total",
                 "vllm:v2drop_probe_watched", "vllm:v2drop_probe_in_flight"):
        assert name in text


@pytest.mark.parametrize("xargs", [{"v2drop_off": True}, {"v2drop_keep_ratios": [1.0, 1.0, 1.0]}],
                         ids=["off", "keep_all"])
def test_unpruned_requests_probe_as_exact_agreement(client, server, xargs):
    """Nothing dropped: every answer token is the unpruned model's top-1, gap exactly 0."""
    url, model = server
    p = Probe(url)
    answer = ask(client, model, IMAGE, {**xargs, "v2drop_probe": True})
    d = p.settled()
    assert d["requests"] == 1 and skipped(d) == 0
    assert d["agreement"] == 1.0 and d["gap"] == 0.0
    assert d["probe_tokens"] > len(answer)
    assert metric(d["text"], "vllm:v2drop_probe_agreement_bucket", le="0.99", retention="1") == 0
    assert metric(d["text"], "vllm:v2drop_probe_agreement_count", retention="1", modality="image") >= 1


@pytest.mark.parametrize("name", [c[0] for c in CASES] + ["stop"])
def test_probe_equals_two_offline_runs(client, server, reference, name):
    """The probe's per-request agreement and gap equal the offline pruned run + teacher-forced run;
    the shadow's tokens are the probe's, not the client's."""
    url, model = server
    ref = reference[name]
    content, _, xargs = next(((c, i, x) for n, c, i, x in CASES if n == name), (IMAGE, None, {}))
    p = Probe(url)
    answer = ask(client, model, content, xargs, stop=ref["stop"])
    assert answer == ref["answer"]
    d = p.settled()
    assert d["requests"] == 1 and d["count"] == 1 and skipped(d) == 0
    assert d["agreement"] == pytest.approx(ref["agreement"], abs=1e-9)
    assert d["gap"] == pytest.approx(ref["gap"], abs=1e-6)
    assert d["client_tokens"] == len(ref["prompt"])
    assert d["probe_tokens"] == len(ref["prompt"]) + len(ref["answer"])


def test_client_tokens_identical_with_probe_on_and_off_under_concurrency(client, server, reference):
    url, model = server
    ref = reference["default"]["answer"]
    choices = [True, False] * 5
    p = Probe(url)
    with ThreadPoolExecutor(len(choices)) as pool:
        answers = list(pool.map(lambda c: ask(client, model, IMAGE, {"v2drop_probe": c}), choices))
    assert all(a == ref for a in answers)
    d = p.settled(accounted=choices.count(True))
    assert d["requests"] + skipped(d) == choices.count(True)  # v2drop_probe false exempts one at rate 1.0
    assert d["requests"] >= 1


def test_an_aborted_request_is_never_probed(client, server):
    url, model = server
    p = Probe(url)
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": IMAGE}], max_tokens=1900, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True, "vllm_xargs": {"v2drop_probe": True}})
    got = 0
    for chunk in resp:
        got += sum(len((ch.model_extra or {}).get("token_ids") or []) for ch in chunk.choices)
        if got >= 2:
            break
    resp.close()  # the server aborts the request
    d = p.settled()
    assert d["requests"] == 0 and skipped(d) == 0 and d["probe_tokens"] == 0
    assert ask(client, model, IMAGE, {"v2drop_probe": True})  # still serving, still probing
    assert p.settled()["requests"] == 1


def test_max_in_flight_reached_skips_and_counts(client, server, reference):
    """Four requests finish in the same step: two shadows start (max_in_flight 2), two are skipped."""
    url, model = server
    p = Probe(url)
    post(url, "/pause?mode=keep")
    answers = []
    try:
        threads = [threading.Thread(target=lambda: answers.append(ask(client, model, IMAGE))) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while p.read()["watched"] < 4:  # all four admitted and queued behind the pause
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        post(url, "/resume")
    for t in threads:
        t.join(120)
    assert answers == [reference["default"]["answer"]] * 4
    d = p.settled()
    assert (d["requests"], d["in_flight"], skipped(d)) == (2, 2, 2)
