"""Every touch of vLLM's internals, one module per seam, each declaring what it touches.

V2Drop wraps, overrides and calls vLLM internals that vLLM does not promise to keep. Each seam
module holds both its declaration (``SEAM``: every target with the parameters V2Drop relies on,
written out as vLLM 0.32 has them, ``version.SUPPORTED_VLLM``) and the code that touches vLLM
there:

* :mod:`.registry`: model registry, ``--model-impl v2drop``, the config hook (every process);
* :mod:`.scheduler`: whole vision items per step; plans reach the KV cache (engine core);
* :mod:`.kv_cache`: the coordinator, the stage managers, the per-stage KV spec (engine core, worker);
* :mod:`.runner`: each stage's attention metadata and slot mapping (worker);
* :mod:`.frontend`: per-request settings at admission, metrics (API server / ``LLM``);
* :mod:`.probe`: the quality probe's shadow requests (API server / ``LLM``);
* :mod:`.models`: the model classes of ``models/`` (declaration only).

Every replacement goes through :func:`._patch.patch` (one idempotency scheme). :func:`check_seams`
compares the declarations with the running vLLM once per process and raises one
:class:`V2DropSeamError` naming every difference: the seam, the qualified name, the expected and
the found signature, and the supported vLLM versions. It runs only when V2Drop is asked for (the
config hook and the ``--model-impl v2drop`` mapping, after the version check), so a stock engine
never pays for it, and a vLLM build that differs from the release V2Drop was written for stops at
start-up instead of failing later inside a step.

Porting to another vLLM: read the new signatures of every target, adapt the code named in
``Touch.by``, then update the declarations and ``SUPPORTED_VLLM`` together.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from vllm_v2drop.seams._check import (  # noqa: F401  (the declaration vocabulary, for tests and porting)
    CALLS,
    EXACT,
    NAMES,
    Mismatch,
    Seam,
    Touch,
    V2DropSeamError,
    check_seam,
    seam_message,
)

__all__ = ["SEAMS", "V2DropSeamError", "all_seams", "check_seams", "find_mismatches", "install"]


def all_seams() -> tuple[Seam, ...]:
    """Every seam's declaration (imports the seam modules, hence vLLM's internals they subclass)."""
    from vllm_v2drop.seams import frontend, kv_cache, models, probe, registry, runner, scheduler

    return (scheduler.SEAM, kv_cache.SEAM, runner.SEAM, frontend.SEAM, probe.SEAM, registry.SEAM, models.SEAM)


def __getattr__(name: str):
    if name == "SEAMS":  # imported on first use: the plugin's registration on another vLLM never needs it
        return all_seams()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install() -> None:
    """What V2Drop puts into every vLLM process (``register()`` calls it; idempotent).

    Every process: the model registry and the config hook. The engine core's scheduler and
    KV-cache wrappers and the API server's frontend wrappers are installed everywhere too (vLLM
    loads plugins before a process knows its role; they do nothing for other models and in
    processes that never call them). The worker's part comes with the model
    (:func:`vllm_v2drop.seams.runner.install_worker`). On a vLLM other than the supported one only
    the version guard is registered.
    """
    from vllm_v2drop.seams import registry
    from vllm_v2drop.version import warn_if_unsupported

    if not warn_if_unsupported():
        registry.install_version_guard()
        return
    if not registry.install(check_seams):
        return  # this process has it already
    from vllm_v2drop.seams import frontend, kv_cache, scheduler

    kv_cache.install()  # engine core: the per-stage KV spec (unpickled from the workers)
    scheduler.install()  # engine core: whole vision items per step, plans for the KV cache
    frontend.install()  # API server: per-request settings, metrics


# seam name -> its mismatches, once checked in this process
_results: dict[str, tuple[Mismatch, ...]] = {}


def check_seams(seams: Iterable[str] | None = None) -> None:
    """Raise :class:`V2DropSeamError` unless the running vLLM matches every seam's declaration.

    ``seams``: names of the seams to check; None: every seam this process touches (the model
    runner's only where vLLM's runner is imported, so the API server never imports it). Each
    seam is checked once per process; later calls cost a few dictionary lookups.
    """
    found = find_mismatches(seams)
    if found:
        raise V2DropSeamError(seam_message(found))


def find_mismatches(seams: Iterable[str] | None = None) -> list[Mismatch]:
    """Every difference between the declarations (or the named seams') and the running vLLM."""
    declared = all_seams()
    if seams is None:
        chosen = [s for s in declared if s.where is None or s.where in sys.modules]
    else:
        by_name = {s.name: s for s in declared}
        chosen = [by_name[name] for name in seams]
    out: list[Mismatch] = []
    for seam in chosen:
        result = _results.get(seam.name)
        if result is None:
            result = _results[seam.name] = tuple(check_seam(seam))
        out += result
    return out
