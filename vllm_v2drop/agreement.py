"""``vllm-v2drop agreement``: what each V2Drop budget does to the answers of your own requests.

Runs every request of a JSONL file (OpenAI chat format: one ``{"messages": [...]}`` object per
line, optionally with ``"max_tokens"``; images and videos as ``image_url`` / ``video_url`` parts
by URL, data URL or file path, relative paths from the file's folder) through one offline
engine at each budget (the per-request ``v2drop_target_retention``), greedy. Each answer then
gets the live probe's teacher-forced shadow (:mod:`vllm_v2drop.frontend.probe`): the unpruned
model's top-1 agreement with the answer and its log-probability gap
(:mod:`vllm_v2drop.core.quality`). Prints one row per budget (mean and 10th-percentile
agreement, mean gap, the retention reached, the prefill FLOP saving of
:mod:`vllm_v2drop.core.flops`) and draws agreement against retention (``--png``, needs
matplotlib: ``pip install vllm-v2drop[bench]``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_v2drop.core.flops import lm_shape, prefill_flops_of_rows
from vllm_v2drop.core.quality import percentile

__all__ = ["BudgetRow", "draw", "load_requests", "make_engine", "measure_budgets", "run", "table"]

DEFAULT_BUDGETS = (0.5, 0.35, 0.25, 0.15)
_REMOTE = ("http://", "https://", "data:", "file:")


@dataclass(frozen=True)
class BudgetRow:
    budget: float
    requests: int  # probed
    skipped: int  # chosen but not probed (see the probe's skip reasons)
    retention: float  # mean share of vision rows present per layer
    agreement_mean: float
    agreement_p10: float
    logprob_gap: float  # mean over requests, nats
    flop_saving: float  # 1 - V2Drop / stock prefill FLOPs of the decoder layers, over the requests


def load_requests(path: str | Path) -> tuple[list[dict], list[str]]:
    """The requests of a JSONL file, and the local folders their media come from.

    A line is ``{"messages": [...], "max_tokens": n}`` or a bare list of messages. A media part
    whose URL is a path becomes a ``file://`` URL (relative to the file's folder)."""
    path = Path(path)
    requests, folders = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err})") from None
        req = {"messages": obj} if isinstance(obj, list) else obj
        if not isinstance(req, Mapping) or not isinstance(req.get("messages"), list):
            raise ValueError(f'{path}:{n}: expected {{"messages": [...]}} or a list of messages')
        for msg in req["messages"]:
            content = msg.get("content") if isinstance(msg, Mapping) else None
            for part in content if isinstance(content, list) else ():
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind in ("image_url", "video_url") and isinstance(part.get(kind), Mapping):
                    url = str(part[kind].get("url", ""))
                    if not url.startswith(_REMOTE):
                        local = (path.parent / url).resolve()
                        if not local.is_file():
                            raise ValueError(f"{path}:{n}: no such file {local}")
                        part[kind]["url"] = local.as_uri()
                        folders.add(str(local.parent))
        requests.append(dict(req))
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests, sorted(folders)


def probe_settings(n: int) -> dict:
    """The finder's probe: every request asks for it, none is ever skipped for load."""
    return {"rate": 0.0, "max_in_flight": max(n, 1), "max_waiting": 1 << 30}


def measure_budgets(llm, requests: Sequence[Mapping], budgets: Sequence[float], max_tokens: int = 64):
    """Every request at every budget on ``llm`` (a V2Drop ``vllm.LLM`` whose quality probe is on
    with :func:`probe_settings`): ``(rows, per_request)`` where ``per_request[(budget, i)]`` is
    the :class:`~vllm_v2drop.frontend.probe.ProbeResult` of request ``i`` (absent: skipped)."""
    from vllm import SamplingParams

    from vllm_v2drop.frontend.stats import stats_of

    engine = llm.llm_engine
    stats = stats_of(engine)
    probe = stats.probe if stats is not None else None
    if probe is None:
        raise RuntimeError("the engine has no V2Drop quality probe (model_impl v2drop, quality_probe set)")
    convs, params, keys = [], [], []
    for b in budgets:
        for i, r in enumerate(requests):
            convs.append(r["messages"])
            params.append(SamplingParams(temperature=0.0, max_tokens=int(r.get("max_tokens") or max_tokens),
                                         extra_args={"v2drop_target_retention": float(b), "v2drop_probe": True}))
            keys.append((b, i))
    probe.results.clear()
    outputs = llm.chat(convs, params, use_tqdm=False)
    while probe.shadows:  # the shadows of the last answers
        engine.step()
    by_id = {r.external_id: r for r in probe.results}
    probe.results.clear()
    per_request = {k: by_id[o.request_id] for k, o in zip(keys, outputs) if o.request_id in by_id}
    shape = lm_shape(_model_config(llm))
    rows = []
    for b in budgets:
        got = [per_request[(b, i)] for i in range(len(requests)) if (b, i) in per_request]
        agreements = [r.agreement for r in got]
        stock = sum(prefill_flops_of_rows(shape, r.prompt_tokens, r.vision_rows) for r in got)
        pruned = sum(prefill_flops_of_rows(shape, r.prompt_tokens, r.vision_rows, r.vision_rows_per_layer)
                     for r in got)
        rows.append(BudgetRow(
            budget=float(b), requests=len(got), skipped=len(requests) - len(got),
            retention=_mean([r.retention for r in got]), agreement_mean=_mean(agreements),
            agreement_p10=percentile(agreements, 10), logprob_gap=_mean([r.logprob_gap for r in got]),
            flop_saving=1.0 - pruned / stock if stock else float("nan")))
    return rows, per_request


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _model_config(llm) -> dict:
    hf = llm.llm_engine.vllm_config.model_config.hf_config
    return hf.to_dict()


def table(rows: Sequence[BudgetRow]) -> str:
    head = ("budget", "requests", "retention", "agreement", "p10 agreement", "logprob gap", "prefill FLOP saving")
    lines = [head]
    for r in rows:
        lines.append((f"{r.budget:g}", f"{r.requests}" + (f" ({r.skipped} skipped)" if r.skipped else ""),
                      f"{r.retention:.3f}", f"{r.agreement_mean:.3f}", f"{r.agreement_p10:.3f}",
                      f"{r.logprob_gap:.3f}", f"{r.flop_saving:.1%}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def draw(rows: Sequence[BudgetRow], path: str | Path, title: str = "") -> Path:
    """Agreement (mean and 10th percentile) against the retention each budget reached."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--png needs matplotlib: pip install 'vllm-v2drop[bench]'") from None
    pts = sorted((r for r in rows if r.requests), key=lambda r: r.retention)
    xs = [r.retention for r in pts] + [1.0]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot(xs, [r.agreement_mean for r in pts] + [1.0], "o-", label="mean top-1 agreement")
    ax.plot(xs, [r.agreement_p10 for r in pts] + [1.0], "s--", label="10th percentile")
    for r in pts:
        ax.annotate(f"{r.budget:g}\n-{r.flop_saving:.0%} FLOP", (r.retention, r.agreement_mean),
                    textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xlabel("vision rows kept per layer (retention)")
    ax.set_ylabel("answer tokens the unpruned model ranks top-1")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(min([0.0] + [r.agreement_p10 for r in pts]) - 0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "V2Drop budget vs agreement with the unpruned model", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def make_engine(model: str, num_requests: int, folders: Sequence[str] = (), v2drop_config: Mapping | None = None,
                engine_args: Mapping | None = None):
    """The finder's engine: V2Drop with the user's settings, request overrides allowed, the probe on."""
    from vllm import LLM

    cfg = {**(v2drop_config or {}), "allow_request_overrides": True, "quality_probe": probe_settings(num_requests)}
    kw = dict(engine_args or {})
    if folders:
        kw.setdefault("allowed_local_media_path", os.path.commonpath(list(folders)))
    return LLM(model, model_impl="v2drop", additional_config={"v2drop": cfg}, **kw)


def run(model: str, requests_file: str, budgets: Sequence[float] = DEFAULT_BUDGETS, png: str | None = None,
        max_tokens: int = 64, v2drop_config: Mapping | None = None, engine_args: Mapping | None = None,
        llm=None) -> str:
    """The command: one engine (``llm``, or one from :func:`make_engine`), every budget; returns the
    printed table."""
    requests, folders = load_requests(requests_file)
    if not budgets or any(not 0.0 < b <= 1.0 for b in budgets):
        raise SystemExit(f"--budgets: numbers in (0, 1], got {list(budgets)}")
    own = llm is None
    if own:
        llm = make_engine(model, len(requests) * len(budgets), folders, v2drop_config, engine_args)
    try:
        rows, _ = measure_budgets(llm, requests, budgets, max_tokens)
    finally:
        core = getattr(llm.llm_engine, "engine_core", None) if own else None
        if core is not None:
            core.shutdown()
    text = table(rows)
    if png:
        draw(rows, png, title=f"{Path(model).name}: {len(requests)} requests, teacher-forced top-1 agreement")
        text += f"\n\nwrote {png}"
    return text
