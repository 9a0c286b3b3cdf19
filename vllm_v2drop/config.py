"""V2Drop settings, read from ``--additional-config '{"v2drop": {...}}'``.

:class:`V2DropConfig` validates what the user wrote (types, ranges, the
combinations that make sense). Once the model depth is known,
:meth:`V2DropConfig.resolve` turns it into a :class:`ResolvedSchedule`: the
exact layers and keep ratios to run, with one log line saying where they came
from. Every rejection is a :class:`V2DropConfigError` whose message names the
field and what it allows.

Schedule sources, first match wins:

1. ``layers`` + ``keep_ratios`` (or + ``target_retention``): used as given.
2. ``preset`` (optionally with ``keep_ratios`` or ``target_retention`` to
   replace the preset's ratios): the preset's layers, scaled to the model depth.
3. nothing: the architecture's default preset (see
   :data:`vllm_v2drop.presets.DEFAULT_PRESET_BY_ARCHITECTURE`), likewise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from vllm_v2drop.core.architectures import base_architecture
from vllm_v2drop.core.counts import average_retention, solve_keep_ratios
from vllm_v2drop.core.request_plan import RequestPlan, plan_request
from vllm_v2drop.core.scorers import SCORERS
from vllm_v2drop.errors import V2DropStartupError
from vllm_v2drop.presets import PRESETS, default_preset_for, scale_layers

__all__ = ["QualityProbeConfig", "ResolvedSchedule", "V2DropConfig", "V2DropConfigError", "resolve_schedule"]

Modality = Literal["image", "video"]

_PREFIX = """Invalid V2Drop configuration (--additional-config '{"v2drop": ...}'): """
_PRESET_NAMES = ", ".join(PRESETS)

#: What each field accepts, quoted in error messages.
ALLOWED: dict[str, str] = {
    "preset": f"null or one of: {_PRESET_NAMES}",
    "layers": "null or a list of strictly increasing integers >= 1 and < the model's layer count",
    "keep_ratios": "null or a list of numbers in [0, 1], one per layer",
    "target_retention": "null or a number in (0, 1]",
    "reference_rows": "an integer >= 1",
    "metric": ", ".join(SCORERS),  # the registered scorers (vllm_v2drop.core.scorers)
    "min_keep": "an integer >= 1",
    "modalities": "a non-empty list of distinct values from: image, video",
    "seed": "an integer",
    "trace": "null or a directory path (string)",
    "kv_mode": "shared, per_stage",
    "chunked_items": "true or false",
    "compile_drop_loop": "true or false",
    "allow_request_overrides": "true or false",
    "quality_probe": 'null or an object {"rate": ..., "max_in_flight": ..., "max_waiting": ...}',
}

#: What each field of ``quality_probe`` accepts.
PROBE_ALLOWED: dict[str, str] = {
    "rate": "a number in [0, 1], the share of pruned requests probed",
    "max_in_flight": "an integer >= 1, the most probes running at once",
    "max_waiting": "an integer >= 0, the most requests waiting for their first token at which a probe still starts",
}


class V2DropConfigError(V2DropStartupError):
    """An invalid V2Drop configuration; the message says which field and what it allows."""

    def __init__(self, problem: str) -> None:
        super().__init__(_PREFIX + problem)


def _problem(field: str, text: str) -> str:
    return f"{field}: {text} (allowed: {ALLOWED[field]})"


def _format_validation_error(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        loc = e["loc"]
        if e["type"] == "value_error":  # our own validators already name the field
            problems.append(str(e["ctx"]["error"]))
            continue
        if len(loc) >= 2 and loc[0] == "quality_probe" and isinstance(loc[1], str):
            sub = str(loc[1])
            if e["type"] == "extra_forbidden" or sub not in PROBE_ALLOWED:
                problems.append(f"quality_probe.{sub}: unknown key (allowed keys: {', '.join(PROBE_ALLOWED)})")
            else:
                problems.append(f"quality_probe.{sub}: {e['msg'].lower()}, got {e['input']!r} "
                                f"(allowed: {PROBE_ALLOWED[sub]})")
            continue
        if loc == ("quality_probe",) and e["type"].startswith("model"):
            problems.append(f"quality_probe: must be a JSON object, got {e['input']!r} "
                            f"(allowed: {ALLOWED['quality_probe']})")
            continue
        field = str(loc[0]) if loc else "v2drop"
        where = field + "".join(f"[{part}]" for part in loc[1:])
        if e["type"] == "extra_forbidden":
            problems.append(f"{field}: unknown key (allowed keys: {', '.join(ALLOWED)})")
        elif field in ALLOWED:
            problems.append(f"{where}: {e['msg'].lower()}, got {e['input']!r} (allowed: {ALLOWED[field]})")
        else:
            problems.append(f"{where}: {e['msg']}")
    return "; ".join(problems)


class QualityProbeConfig(BaseModel):
    """``quality_probe``: the live agreement probe (:mod:`vllm_v2drop.frontend.probe`).

    Fields:
        rate: the share of finished pruned requests that get a teacher-forced shadow
            (a request's ``v2drop_probe`` overrides it either way).
        max_in_flight: the most shadows running at once; more are skipped (and counted).
        max_waiting: a shadow is skipped (and counted) while more requests than this wait
            for their first token.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    rate: float = 0.01
    max_in_flight: int = 4
    max_waiting: int = 8

    @field_validator("rate")
    @classmethod
    def _check_rate(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"quality_probe.rate: must lie in [0, 1], got {v} (allowed: {PROBE_ALLOWED['rate']})")
        return float(v)

    @field_validator("max_in_flight")
    @classmethod
    def _check_in_flight(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"quality_probe.max_in_flight: must be >= 1, got {v} "
                             f"(allowed: {PROBE_ALLOWED['max_in_flight']})")
        return v

    @field_validator("max_waiting")
    @classmethod
    def _check_waiting(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"quality_probe.max_waiting: must be >= 0, got {v} "
                             f"(allowed: {PROBE_ALLOWED['max_waiting']})")
        return v


class V2DropConfig(BaseModel):
    """The user's V2Drop settings (``additional_config["v2drop"]``), validated.

    Fields:
        preset: a named schedule (see :mod:`vllm_v2drop.presets`).
        layers: layers before which rows are dropped (``1 <= l_1 < l_2 < ... < L``).
        keep_ratios: share of the rows still present that each stage keeps.
        target_retention: ask for this average share of vision rows per layer
            instead of giving ``keep_ratios``; they are solved for ``layers``
            (or the preset's layers) on an item of ``reference_rows`` rows.
        reference_rows: item size used for ``target_retention`` and reporting.
        metric: how rows are scored, a registered scorer (:mod:`vllm_v2drop.core.scorers`):
            ``l2`` (the paper), ``l1``, ``cosine`` (the paper's first version),
            ``random`` (seeded baseline), ``none`` (no dropping).
        min_keep: the fewest rows a stage keeps per item.
        modalities: which vision items may be pruned.
        seed: seed of the ``random`` metric.
        trace: directory to write per-request traces to.
        kv_mode: ``shared`` (one block table) or ``per_stage`` (KV groups per stage).
        chunked_items: let chunked prefill split a vision item across steps (items longer than
            ``--max-num-batched-tokens``): its rows wait at the first drop layer until the item
            completes (docs/chunked-items.md). Off: every item is computed in one step.
        compile_drop_loop: compile the decoder layers between two drop points of a step that
            drops rows with vLLM's ``torch.compile`` backend, as vLLM compiles the model (never
            with ``--enforce-eager``). Off: such steps run the layers eagerly.
        allow_request_overrides: whether a request may choose its own budget
            (``v2drop_*`` keys of ``SamplingParams.extra_args`` / the OpenAI
            ``vllm_xargs``; see :mod:`vllm_v2drop.overrides`). False pins the
            engine's schedule: such keys are refused.
        quality_probe: the live agreement probe (off when null): :class:`QualityProbeConfig`.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    preset: str | None = None
    layers: list[int] | None = None
    keep_ratios: list[float] | None = None
    target_retention: float | None = None
    reference_rows: int = 576
    metric: str = "l2"
    min_keep: int = 1
    modalities: list[Modality] = ["image", "video"]
    seed: int = 0
    trace: str | None = None
    kv_mode: Literal["shared", "per_stage"] = "shared"
    chunked_items: bool = False
    compile_drop_loop: bool = True
    allow_request_overrides: bool = True
    quality_probe: QualityProbeConfig | None = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise V2DropConfigError(_format_validation_error(err)) from None

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> V2DropConfig:
        """Read ``additional_config["v2drop"]``; a missing key gives the defaults."""
        if additional_config is None:
            return cls()
        if not isinstance(additional_config, Mapping):
            raise V2DropConfigError(f"additional_config must be a JSON object, got {type(additional_config).__name__}")
        raw = additional_config.get("v2drop")
        if raw is None:
            return cls()
        if isinstance(raw, V2DropConfig):
            return raw
        if not isinstance(raw, Mapping):
            raise V2DropConfigError(
                f"v2drop: must be a JSON object, got {raw!r} (allowed keys: {', '.join(ALLOWED)})"
            )
        return cls(**dict(raw))

    @model_validator(mode="before")
    @classmethod
    def _tuples_as_lists(cls, data: Any) -> Any:
        """Accept tuples from Python callers; JSON only ever gives lists."""
        if isinstance(data, dict):
            return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        return data

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in PRESETS:
            raise ValueError(_problem("preset", f"unknown preset {v!r}"))
        return v

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError(_problem("layers", "must not be empty (use metric 'none' to disable dropping)"))
        if min(v) < 1:
            raise ValueError(_problem("layers", f"layer {min(v)} is < 1 in {v}"))
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(_problem("layers", f"must be sorted and without duplicates, got {v}"))
        return v

    @field_validator("metric")
    @classmethod
    def _check_metric(cls, v: str) -> str:
        if v not in SCORERS:
            raise ValueError(_problem("metric", f"unknown metric {v!r}"))
        return v

    @field_validator("keep_ratios")
    @classmethod
    def _check_ratios(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not 0.0 <= r <= 1.0 for r in v):
            raise ValueError(_problem("keep_ratios", f"every ratio must lie in [0, 1], got {v}"))
        return v

    @field_validator("target_retention")
    @classmethod
    def _check_target(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(_problem("target_retention", f"must lie in (0, 1], got {v}"))
        return v

    @field_validator("reference_rows", "min_keep")
    @classmethod
    def _check_positive(cls, v: int, info: Any) -> int:
        if v < 1:
            raise ValueError(_problem(info.field_name, f"must be >= 1, got {v}"))
        return v

    @field_validator("modalities")
    @classmethod
    def _check_modalities(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(_problem("modalities", f"got {v}"))
        return v

    @model_validator(mode="after")
    def _check_combination(self) -> V2DropConfig:
        if self.keep_ratios is not None and self.target_retention is not None:
            raise ValueError(
                "keep_ratios, target_retention: give one of them, not both "
                "(allowed: keep_ratios alone, target_retention alone, or neither)"
            )
        if self.keep_ratios is not None:
            if self.layers is not None:
                n_layers, whose = len(self.layers), "layers"
            elif self.preset is not None:
                n_layers, whose = len(PRESETS[self.preset].layers), f"preset {self.preset!r}"
            else:
                raise ValueError(
                    _problem("keep_ratios", "needs layers (or a preset to take the layers from)")
                )
            if len(self.keep_ratios) != n_layers:
                raise ValueError(
                    _problem(
                        "keep_ratios",
                        f"has {len(self.keep_ratios)} ratios but {whose} has {n_layers} layers",
                    )
                )
        elif self.layers is not None and self.target_retention is None:
            raise ValueError(_problem("layers", "need keep_ratios or target_retention to go with them"))
        return self

    def resolve(self, num_layers: int, architecture: str) -> ResolvedSchedule:
        """The schedule to run on a model with ``num_layers`` decoder layers.

        Raises :class:`V2DropConfigError` when user-given layers do not fit the
        model, or when no schedule was given and ``architecture`` has no default.
        """
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        notes: list[str] = []
        if self.layers is not None:
            if self.layers[-1] >= num_layers:
                raise V2DropConfigError(
                    _problem(
                        "layers",
                        f"layer {self.layers[-1]} does not exist in a model with {num_layers} layers "
                        f"(layers must be < {num_layers})",
                    )
                )
            layers: tuple[int, ...] = tuple(self.layers)
            ratios: tuple[float, ...] = tuple(self.keep_ratios or (0.0,) * len(layers))
            source = "user schedule"
        else:
            name = self.preset or default_preset_for(architecture)
            if name is None:
                raise V2DropConfigError(
                    _problem(
                        "preset",
                        f"architecture {architecture!r} has no default schedule; give a preset or layers",
                    )
                )
            p = PRESETS[name]
            base_ratios = tuple(self.keep_ratios) if self.keep_ratios is not None else p.keep_ratios
            layers, ratios, notes = scale_layers(p.layers, base_ratios, p.ref_depth, num_layers)
            source = f"preset {name!r}" + ("" if self.preset else f" (default for {architecture})")
            if p.ref_depth != num_layers:
                source += f", written for {p.ref_depth} layers, scaled to {num_layers}"
        target = self.target_retention
        if target is None and self.layers is None and self.keep_ratios is None:
            p = PRESETS[self.preset or default_preset_for(architecture)]
            if p.target_retention is not None and p.ref_depth != num_layers:
                target = p.target_retention  # a budget preset keeps its budget at any depth
        if target is not None and layers:
            ratios, _ = solve_keep_ratios(layers, num_layers, target, self.reference_rows, self.min_keep)
            source += f", keep_ratios solved for target_retention {round(target, 4)}"

        if self.metric == "none":
            layers, ratios = (), ()
            notes.append("metric 'none': nothing is dropped")
        achieved = (
            average_retention(self.reference_rows, layers, ratios, num_layers, self.min_keep) if layers else 1.0
        )
        description = (
            f"V2Drop: {source}: layers {list(layers)}, keep_ratios {list(ratios)}, metric {self.metric}, "
            f"average retention {achieved:.1%} ({achieved * self.reference_rows:.1f} of "
            f"{self.reference_rows} rows per layer)"
        )
        if notes:
            description += "; " + "; ".join(notes)
        return ResolvedSchedule(
            layers=layers,
            keep_ratios=ratios,
            min_keep=self.min_keep,
            metric=self.metric,
            seed=self.seed,
            num_layers=num_layers,
            description=description,
            achieved_retention=achieved,
            modalities=tuple(self.modalities),
            trace=self.trace,
            kv_mode=self.kv_mode,
            chunked_items=self.chunked_items,
            compile_drop_loop=self.compile_drop_loop,
            reference_rows=self.reference_rows,
            allow_request_overrides=self.allow_request_overrides,
        )


@dataclass(frozen=True)
class ResolvedSchedule:
    """The schedule a model runs: what :meth:`V2DropConfig.resolve` returns.

    ``layers`` is empty when nothing is dropped (metric ``none``, or a model
    too shallow for any stage). ``achieved_retention`` is the average share of
    an item's vision rows present per layer, for the config's ``reference_rows``.
    ``reference_rows`` and ``min_keep`` also solve a request's own
    ``v2drop_target_retention`` (:mod:`vllm_v2drop.overrides`).
    """

    layers: tuple[int, ...]
    keep_ratios: tuple[float, ...]
    min_keep: int
    metric: str
    seed: int
    num_layers: int
    description: str
    achieved_retention: float
    modalities: tuple[Modality, ...] = ("image", "video")
    trace: str | None = None
    kv_mode: Literal["shared", "per_stage"] = "shared"
    chunked_items: bool = False
    compile_drop_loop: bool = True
    reference_rows: int = 576
    allow_request_overrides: bool = True

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    def plan(self, items: Any, num_prompt_tokens: int, prune: bool = True,
             keep_ratios: tuple[float, ...] | None = None) -> RequestPlan:
        """:func:`vllm_v2drop.core.request_plan.plan_request` with this schedule's ratios (or a request's own
        ``keep_ratios``, one per layer of this schedule) and ``min_keep``."""
        ratios = self.keep_ratios if keep_ratios is None else keep_ratios
        return plan_request(items, num_prompt_tokens, ratios, self.min_keep, prune=prune)


def resolve_schedule(vllm_config) -> ResolvedSchedule:
    """The V2Drop schedule for this engine, from ``--additional-config`` and the model's depth.

    Each process resolves it once, where its seam first meets the engine's config (the config hook,
    the scheduler, the model, the frontend), and hands it down; nothing below resolves it again.
    """
    config = V2DropConfig.from_additional_config(vllm_config.additional_config)
    model_config = vllm_config.model_config
    num_layers = model_config.hf_text_config.num_hidden_layers
    return config.resolve(num_layers, base_architecture(model_config.architecture))
