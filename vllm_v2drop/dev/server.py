"""Start ``vllm serve`` as a subprocess, wait for it, stop it cleanly.

    with serve("build/demo-model", ["--enforce-eager"]) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY")

The server runs in its own process group, so stopping it also ends vLLM's
engine-core subprocess. Its log goes to a temporary file, shown on failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

# Quiet, offline defaults; the caller's environment and ``env`` win.
DEFAULT_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # Children (the engine core) may outlive the API process for a moment.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def serve(
    model: str | Path,
    extra_args: Sequence[str] = (),
    port: int | None = None,
    env: Mapping[str, str | None] | None = None,
    startup_timeout: float = 300.0,
    log_path: str | Path | None = None,
) -> Iterator[str]:
    """Run ``vllm serve MODEL EXTRA_ARGS`` on 127.0.0.1; yield its base URL (no ``/v1``).

    ``env`` adds to (and wins over) the defaults and the caller's environment; a ``None`` value
    removes that variable (e.g. ``{"VLLM_CPU_KVCACHE_SPACE": None}``, so ``--kv-cache-memory-bytes`` counts).
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    full_env = {k: v for k, v in {**DEFAULT_ENV, **os.environ, **(env or {})}.items() if v is not None}
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_bin) if vllm_bin.exists() else "vllm", "serve", str(model),
           "--host", "127.0.0.1", "--port", str(port), *extra_args]
    log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read()[-6000:].decode(errors="replace")
                why = f"exited with {proc.returncode}" if proc.poll() is not None else "did not become healthy"
                raise RuntimeError(f"vllm serve {why} ({' '.join(cmd)}):\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        log.close()
