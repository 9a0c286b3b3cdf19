"""Shared test fixtures and helpers.

* ``tiny_models``: session fixture, arch -> directory of a tiny random model, built once
  into ``$V2DROP_TEST_MODELS`` (default ``<repo>/build/test-models``) and reused while the
  builder version is unchanged.
* inputs: ``make_image`` / ``IMAGE_SIZES``, ``make_video``, ``video_input`` (adds the
  metadata Qwen2.5-VL needs), ``prompt`` (chat-template prompt with the arch's placeholders).
* engines: ``engines``, the session's pool: ``engines.get(model_dir, **kw)`` returns the running
  ``vllm.LLM`` with those settings, or starts one (test defaults, ``kw`` override); test modules
  that ask for the same settings share one engine. ``make_llm`` / ``shutdown_llm`` / ``llm_engine``
  start and stop an engine of a test's own (one that must start fresh, or that a test stops).
* ``@pytest.mark.gpu`` tests are skipped with a reason when no CUDA GPU is present.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE (GiB) override kv_cache_memory_bytes, so tests that
# size the KV pool (LLM_DEFAULTS, preemption, KV memory) need it unset; `vllm serve` subprocesses get
# their own small default from vllm_v2drop.dev.server.
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
# Every per_stage engine of the suite checks each prefix-cache reuse of its KV blocks (vllm_v2drop.worker.audit).
os.environ.setdefault("V2DROP_AUDIT_KV", "1")

# Under pytest-xdist (``make test`` runs two workers), each worker's engines and servers run their
# threads on the worker's own share of the CPUs, so two engines never spin on the same cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _cpus = sorted(os.sched_getaffinity(0))
    _n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _share = _cpus[int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")) % _n::_n] or _cpus
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, _share)))
    os.environ.setdefault("OMP_NUM_THREADS", str(len(_share)))

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("llava", "llava-onevision", "qwen2-vl", "qwen2.5-vl")
VIDEO_ARCHS = ("llava-onevision", "qwen2-vl", "qwen2.5-vl")
# Qwen3-VL, Qwen3-VL-MoE and LLaVA-NeXT: their own engine module (tests/test_engine_new_archs.py), not ARCHS' tests
NEW_ARCHS = ("qwen3-vl", "qwen3-vl-moe", "llava-next")
NEW_VIDEO_ARCHS = ("qwen3-vl", "qwen3-vl-moe")
# Archs whose vLLM video input needs the metadata (fps: Qwen2.5-VL's temporal positions, Qwen3-VL's timestamps)
VIDEO_METADATA_ARCHS = ("qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe")


# ------------------------------------------------------------------------------------------ hooks


# The modules that run longest, first: with ``make test``'s xdist workers taking one module at a time,
# the run then ends on short modules instead of one worker finishing a long one alone.
LONG_MODULES = ("test_soak.py", "test_gpu_run.py", "test_parallel.py", "test_kv_memory.py", "test_engine.py",
                "test_engine_new_archs.py", "test_engine_robustness.py", "test_chunked_items.py",
                "test_benchmark.py", "test_probe.py", "test_request_serving.py", "test_load.py")


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda it: first.get(it.path.name, len(first)))  # stable: the rest keep their order
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for it in gpu_items:
            it.add_marker(skip)


def pytest_configure(config):
    # With xdist workers, build the tiny models once here, before the workers start, rather than
    # in each worker at once.
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        for arch in ARCHS + NEW_ARCHS:
            ensure_model(arch)


# ----------------------------------------------------------------------------------------- models


def models_dir() -> Path:
    return Path(os.environ.get("V2DROP_TEST_MODELS", REPO / "build" / "test-models"))


def ensure_model(arch: str, root: Path | None = None, seed: int = 0) -> Path:
    """Build ``arch`` into ``root/arch`` unless a build of the current builder version is there."""
    from vllm_v2drop.dev.make_model import BUILDER_VERSION, make_model

    root = root or models_dir()
    target = root / (arch if seed == 0 else f"{arch}-seed{seed}")
    marker = target / "v2drop_model.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("builder_version") == BUILDER_VERSION and info.get("seed") == seed:
            return target
        shutil.rmtree(target, ignore_errors=True)
    # Build aside and rename, so concurrent sessions never see a half-written model.
    tmp = root / f".{target.name}.tmp-{os.getpid()}"
    make_model(arch, tmp, seed=seed)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    return {arch: ensure_model(arch) for arch in ARCHS + NEW_ARCHS}


@pytest.fixture(scope="module")
def model_dir(request, tiny_models) -> Path:
    """The tiny model of the test module's ``ARCH`` (modules parametrized by architecture override it)."""
    return tiny_models[request.module.ARCH]


# ----------------------------------------------------------------------------------------- inputs

# (width, height). LLaVA resizes everything to 64x64 (64 rows); Qwen: 112x112 -> 16 rows,
# 160x120 -> 24 rows (168x112 after rounding to 28), 224x168 -> 48 rows.
IMAGE_SIZES = {"small": (112, 112), "wide": (160, 120), "large": (224, 168)}
VIDEO_SHAPE = (8, 64, 64)  # frames, height, width
VIDEO_FPS = 2.0


def make_image(size: tuple[int, int] | str = "small", seed: int = 0):
    """A deterministic RGB PIL image: smooth gradients plus seeded noise and a few blocks."""
    from PIL import Image

    w, h = IMAGE_SIZES[size] if isinstance(size, str) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(w + h, 1)], -1)
    img = base + rng.normal(0, 30, (h, w, 3))
    for _ in range(4):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        img[y0:y0 + h // 4, x0:x0 + w // 4] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_video(frames: int = VIDEO_SHAPE[0], height: int = VIDEO_SHAPE[1], width: int = VIDEO_SHAPE[2],
               seed: int = 0) -> np.ndarray:
    """A deterministic uint8 video (T, H, W, 3): a moving block over a seeded noisy background."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(0, 256, (height, width, 3)).astype(np.int16)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        f = bg + rng.integers(-20, 21, bg.shape)
        x = (t * width // frames) % (width - width // 4)
        f[height // 4: height // 2, x: x + width // 4] = (255, 64 * (t % 4), 0)
        out[t] = np.clip(f, 0, 255).astype(np.uint8)
    return out


def video_metadata(frames: np.ndarray, fps: float = VIDEO_FPS, for_vllm: bool = False) -> dict:
    """Metadata of an unsampled video; transformers' ``VideoMetadata`` takes the first four keys."""
    n = len(frames)
    meta = {"fps": fps, "duration": n / fps, "total_num_frames": n, "frames_indices": list(range(n))}
    if for_vllm:
        meta.update(video_backend="opencv", do_sample_frames=False)
    return meta


def video_input(arch: str, frames: np.ndarray):
    """What vLLM's ``multi_modal_data["video"]`` takes for ``arch`` (Qwen2.5-VL, Qwen3-VL require metadata)."""
    return (frames, video_metadata(frames, for_vllm=True)) if arch in VIDEO_METADATA_ARCHS else frames


@lru_cache(maxsize=16)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def prompt(arch_or_dir, n_images: int = 0, video: bool = False, text: str = "Describe this.",
           model_dir: str | Path | None = None) -> str:
    """Chat-template prompt with the model's placeholders: ``n_images`` images, then a video, then text.

    ``arch_or_dir`` is a model directory (or pass ``model_dir=``); the template comes from its tokenizer.
    """
    model_dir = str(model_dir or arch_or_dir)
    content = [{"type": "image"} for _ in range(n_images)]
    if video:
        content.append({"type": "video"})
    content.append({"type": "text", "text": text})
    messages = [{"role": "user", "content": content}]
    return _tokenizer(model_dir).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def mm_request(arch: str, model_dir: str | Path, images=(), video=None, text: str = "Describe this.") -> dict:
    """A ``vllm.LLM.generate`` input dict (prompt + multi_modal_data)."""
    req: dict = {"prompt": prompt(model_dir, n_images=len(images), video=video is not None, text=text)}
    mm: dict = {}
    if images:
        mm["image"] = images[0] if len(images) == 1 else list(images)
    if video is not None:
        mm["video"] = video_input(arch, video)
    if mm:
        req["multi_modal_data"] = mm
    return req


# ---------------------------------------------------------------------------------------- engines

LLM_DEFAULTS = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=4096,
    seed=0,
    limit_mm_per_prompt={"image": 2, "video": 1},
    kv_cache_memory_bytes=256 << 20,
)


def engine_config(model_dir, **kw):
    """vLLM's engine config for ``model_dir`` as ``vllm serve`` / ``LLM(...)`` build it (V2Drop's config
    hook and start-up checks run here), without starting an engine."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model_dir), **kw).create_engine_config()


_STARTS: list[str] = []  # the model of every engine started in this session


def make_llm(model_dir: str | Path, **kw):
    """``vllm.LLM`` on ``model_dir`` with test defaults (float32, eager, small KV cache); ``kw`` override."""
    from vllm import LLM

    before = _children()
    _STARTS.append(Path(str(model_dir)).name)
    llm = LLM(str(model_dir), **{**LLM_DEFAULTS, **kw})
    llm._v2drop_children = sorted(_children() - before)  # the engine core (and its helpers)
    return llm


def _children() -> set[int]:
    import psutil

    pids = set()
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(p.cmdline()):  # lives for the whole session
                pids.add(p.pid)
    return pids


def shutdown_llm(llm, timeout: float = 30.0) -> None:
    """Stop ``llm``'s engine core; wait until the processes it started are gone and memory is freed."""
    import psutil

    procs = []
    for pid in getattr(llm, "_v2drop_children", []):
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        with contextlib.suppress(Exception):
            core.shutdown()
    del core
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:  # last resort, so the next engine gets the memory back
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


class EnginePool:
    """The session's engines, one per (model, settings): started on first use, shared by every test
    module that asks for the same settings, stopped when ``capacity`` others are newer (least
    recently used first) or at the session's end. A test must leave a pooled engine as it found it:
    no request left running, no setting changed."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._live: dict[str, object] = {}  # key -> LLM, least recently used first
        self.started = self.reused = 0

    @staticmethod
    def key(model_dir, kw: dict) -> str:
        return json.dumps([str(model_dir), kw], sort_keys=True, default=repr)

    def get(self, model_dir: str | Path, **kw):
        key = self.key(model_dir, kw)
        if key in self._live:
            self.reused += 1
            self._live[key] = self._live.pop(key)
            return self._live[key]
        while len(self._live) >= self.capacity:
            self._stop(next(iter(self._live)))
        self.started += 1
        self._live[key] = make_llm(model_dir, **kw)
        return self._live[key]

    def _stop(self, key: str) -> None:
        shutdown_llm(self._live.pop(key))

    def close(self) -> None:
        while self._live:
            self._stop(next(iter(self._live)))


_POOL = EnginePool(int(os.environ.get("V2DROP_TEST_ENGINES", "2")))


@pytest.fixture(scope="session")
def engines():
    """The session's :class:`EnginePool` (at most ``$V2DROP_TEST_ENGINES``, default 2, alive at once)."""
    yield _POOL
    _POOL.close()


def pytest_terminal_summary(terminalreporter):
    if _STARTS:
        terminalreporter.write_line(f"engines started: {len(_STARTS)} ({_POOL.started} pooled, "
                                    f"reused {_POOL.reused} times)")


@contextlib.contextmanager
def llm_engine(model_dir: str | Path, **kw):
    """``with llm_engine(dir) as llm:`` make_llm + shutdown_llm (for module-scoped fixtures)."""
    llm = make_llm(model_dir, **kw)
    try:
        yield llm
    finally:
        shutdown_llm(llm)


def greedy(max_tokens: int = 16, **kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)
