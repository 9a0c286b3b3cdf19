"""Per-request V2Drop settings: ``v2drop_*`` keys of ``SamplingParams.extra_args``.

The OpenAI server fills ``extra_args`` from the request body's ``vllm_xargs``
(``extra_body={"vllm_xargs": {...}}`` with the ``openai`` client); offline users
pass ``SamplingParams(extra_args={...})``. Keys:

* ``v2drop_off`` (bool): the request is not pruned;
* ``v2drop_target_retention`` (number in ``(0, 1]``): keep ratios solved for the
  engine's layers, as the config's ``target_retention`` is;
* ``v2drop_keep_ratios`` (list of numbers in ``[0, 1]``, one per engine layer);
* ``v2drop_probe`` (bool): on a server with the quality probe on (``quality_probe`` in the
  config), ``true`` probes this request whatever the sampling rate, ``false`` exempts it
  (:mod:`vllm_v2drop.frontend.probe`). It changes nothing in how the request runs.

The layers stay the engine's: they fix the KV-cache layout. :func:`parse` is the one
reader of these keys. The frontend calls it (through :func:`validate`) before a request
is scheduled, so a bad value is an HTTP 400 / offline ``ValueError``; the worker and the
scheduler call it again inside :func:`vllm_v2drop.worker.runtime.plan_for`, so both plan the
request with the same ratios and KV blocks always match the rows written.

vLLM's ``vllm_xargs`` has no boolean type: pydantic turns JSON ``true`` / ``false``
into ``1`` / ``0``, so ``v2drop_off`` and ``v2drop_probe`` accept those too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from vllm_v2drop.core.counts import solve_keep_ratios
from vllm_v2drop.seams.errors import validation_error_base

__all__ = ["KEYS", "RequestOverride", "V2DropRequestError", "parse", "probe_choice", "validate"]

PREFIX = "v2drop_"

#: Key -> what it allows (quoted in every error message).
KEYS: dict[str, str] = {
    "v2drop_off": "true or false (1 or 0)",
    "v2drop_target_retention": "a number in (0, 1]",
    "v2drop_keep_ratios": "a list of numbers in [0, 1], one per layer of the engine's schedule",
    "v2drop_probe": "true or false (1 or 0)",
}


class V2DropRequestError(validation_error_base(), ValueError):
    """A bad per-request V2Drop setting.

    A ``ValueError`` (what offline ``LLM.generate`` raises) and vLLM's
    ``VLLMValidationError`` (what the OpenAI server answers with HTTP 400).
    """

    def __init__(self, key: str, problem: str) -> None:
        allowed = KEYS.get(key, ", ".join(KEYS))
        what = "allowed keys" if key not in KEYS else "allowed"
        message = f"Invalid per-request V2Drop setting vllm_xargs.{key}: {problem} ({what}: {allowed})"
        try:
            super().__init__(message, parameter=f"vllm_xargs.{key}")
        except TypeError:  # pragma: no cover
            super().__init__(message)
        self.key = key

    def __str__(self) -> str:  # the message alone; the OpenAI error's "param" field names the key
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class RequestOverride:
    """What a request asked for: off, or its own keep ratios (one per engine layer); and whether
    the quality probe must (True) or must not (False) probe it (None: the sampling rate decides)."""

    off: bool = False
    keep_ratios: tuple[float, ...] | None = None
    source: str = ""  # "off" | "target_retention=0.3" | "keep_ratios" (for logs)
    probe: bool | None = None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@lru_cache(maxsize=256)
def _solved(layers: tuple[int, ...], num_layers: int, target: float, reference_rows: int,
            min_keep: int) -> tuple[float, ...]:
    """The config's ``target_retention`` solve, cached: every request with the same value shares it."""
    return solve_keep_ratios(layers, num_layers, target, reference_rows, min_keep).keep_ratios


def parse(extra_args: Mapping[str, Any] | None, schedule) -> RequestOverride | None:
    """The request's V2Drop settings, or None when it has none (the engine's schedule applies).

    Raises :class:`V2DropRequestError` naming the key and what it allows: an unknown
    ``v2drop_*`` key, a wrong type, a ratio outside ``[0, 1]``, a list whose length is not the
    engine's layer count, ``v2drop_keep_ratios`` together with ``v2drop_target_retention``,
    or any key on an engine with ``allow_request_overrides: false``.
    """
    if not extra_args:
        return None
    keys = [k for k in extra_args if isinstance(k, str) and k.startswith(PREFIX)]
    if not keys:
        return None
    for k in keys:
        if k not in KEYS:
            raise V2DropRequestError(k, "unknown key")
    if not getattr(schedule, "allow_request_overrides", True):
        raise V2DropRequestError(
            keys[0], "this server pins its V2Drop schedule (allow_request_overrides: false); "
            "send the request without v2drop_* keys")

    off = _flag(extra_args, "v2drop_off") or False
    probe = _flag(extra_args, "v2drop_probe")
    if "v2drop_keep_ratios" in extra_args and "v2drop_target_retention" in extra_args:
        raise V2DropRequestError("v2drop_keep_ratios",
                                 "give v2drop_keep_ratios or v2drop_target_retention, not both")

    layers = tuple(schedule.layers)
    ratios: tuple[float, ...] | None = None
    source = "off" if off else ""
    if "v2drop_target_retention" in extra_args:
        v = extra_args["v2drop_target_retention"]
        if not _is_number(v) or not 0.0 < v <= 1.0:
            raise V2DropRequestError("v2drop_target_retention", f"got {v!r}")
        if layers:
            ratios = _solved(layers, schedule.num_layers, float(v), schedule.reference_rows, schedule.min_keep)
        source = source or f"target_retention={v}"
    if "v2drop_keep_ratios" in extra_args:
        v = extra_args["v2drop_keep_ratios"]
        if not isinstance(v, (list, tuple)) or not all(_is_number(r) for r in v):
            raise V2DropRequestError("v2drop_keep_ratios", f"got {v!r}")
        if len(v) != len(layers):
            raise V2DropRequestError(
                "v2drop_keep_ratios",
                f"got {len(v)} ratio(s), but this engine drops at {len(layers)} layer(s) {list(layers)}")
        bad = [r for r in v if not 0.0 <= r <= 1.0]
        if bad:
            raise V2DropRequestError("v2drop_keep_ratios", f"ratio {bad[0]!r} is outside [0, 1] in {list(v)}")
        ratios = tuple(float(r) for r in v)
        source = source or "keep_ratios"
    return RequestOverride(off=off, keep_ratios=None if off else ratios, source=source, probe=probe)


def _flag(extra_args: Mapping[str, Any], key: str) -> bool | None:
    if key not in extra_args:
        return None
    v = extra_args[key]
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return bool(v)
    raise V2DropRequestError(key, f"got {v!r}")


def probe_choice(extra_args: Mapping[str, Any] | None, schedule) -> bool | None:
    """The request's ``v2drop_probe`` (True / False), or None when it sends none (or a bad
    setting, which the frontend refused already)."""
    if not extra_args or "v2drop_probe" not in extra_args:
        return None
    try:
        override = parse(extra_args, schedule)
    except ValueError:
        return None
    return None if override is None else override.probe


def validate(sampling_params, schedule) -> None:
    """Raise :class:`V2DropRequestError` if ``sampling_params.extra_args`` has a bad ``v2drop_*`` setting."""
    parse(getattr(sampling_params, "extra_args", None), schedule)
