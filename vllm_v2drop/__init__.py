"""V2Drop for vLLM: variation-aware vision token dropping inside the language model.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process (API server, engine core, workers, the registry's inspection
subprocess), so it is idempotent, cheap and never touches CUDA.
"""

from __future__ import annotations

__version__ = "0.1.0"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group: :func:`vllm_v2drop.seams.install`."""
    from vllm_v2drop.errors import install_excepthook
    from vllm_v2drop.seams import install

    install_excepthook()  # a start-up refusal ends the program with its one-line message
    install()
