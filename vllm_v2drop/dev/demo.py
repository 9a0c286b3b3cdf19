"""Demo: serve a vision-language model with ``--model-impl v2drop`` and ask it about an image and a video.

    python -m vllm_v2drop.dev.demo [MODEL] [--v2drop-config JSON] [--port N] [--log FILE]

Without MODEL it builds the tiny random LLaVA-OneVision model into
``build/demo-model`` (no network), so the answers are meaningless text; the point
is the whole path: build, ``vllm serve --model-impl v2drop``, two OpenAI chat
requests (an image and an mp4 video, both as base64 data URLs) through the
official ``openai`` client, the V2Drop statistics the server logged for each
request, and a clean stop.

The helpers here (``image_data_url``, ``video_data_url``, ``read_log``,
``parse_request_stats``, ``stats_for``) are reused by the serving tests and by
``benchmarks/bench_v2drop.py``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# ------------------------------------------------------------------------------------------ media


def _frame(width: int, height: int, seed: int, t: int = 0, frames: int = 1):
    """A deterministic RGB frame (uint8 HxWx3): gradients, seeded noise and a block moving with ``t``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1),
                    (xx + yy) * 127 / max(width + height, 1)], -1)
    img = img + rng.normal(0, 25, (height, width, 3))
    for _ in range(3):
        x0, y0 = rng.integers(0, max(width // 2, 1)), rng.integers(0, max(height // 2, 1))
        img[y0:y0 + height // 4, x0:x0 + width // 4] = rng.integers(0, 256, 3)
    x = (t * width // max(frames, 1)) % max(width - width // 4, 1)
    img[height // 2: 3 * height // 4, x: x + width // 4] = (255, 64 * (t % 4), 0)
    return np.clip(img, 0, 255).astype(np.uint8)


def image_bytes(size: tuple[int, int] = (128, 96), seed: int = 0, fmt: str = "PNG") -> bytes:
    """An encoded deterministic image of ``size`` = (width, height)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_frame(size[0], size[1], seed)).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def image_data_url(size: tuple[int, int] = (128, 96), seed: int = 0, fmt: str = "PNG") -> str:
    """``data:image/...;base64,...`` for an OpenAI ``image_url`` content part."""
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(image_bytes(size, seed, fmt)).decode()


def video_bytes(frames: int = 8, size: tuple[int, int] = (64, 64), fps: float = 2.0, seed: int = 0) -> bytes:
    """An mp4 (MPEG-4 part 2, OpenCV's ``mp4v``) of ``frames`` deterministic frames of ``size`` = (w, h)."""
    import cv2

    width, height = size
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write mp4 (mp4v) videos on this machine")
        for t in range(frames):
            writer.write(_frame(width, height, seed, t, frames)[..., ::-1].copy())  # RGB -> BGR
        writer.release()
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


def video_data_url(frames: int = 8, size: tuple[int, int] = (64, 64), fps: float = 2.0, seed: int = 0) -> str:
    """``data:video/mp4;base64,...`` for a ``video_url`` content part (vLLM decodes it with OpenCV)."""
    return "data:video/mp4;base64," + base64.b64encode(video_bytes(frames, size, fps, seed)).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


# ------------------------------------------------------------------------------ server log parsing

STARTUP_RE = re.compile(r"(?P<text>V2Drop(?: forces| prefix caching)?: .*)$")
REQUEST_RE = re.compile(
    r"V2Drop request (?P<id>\S+): (?P<rows>\d+) vision rows in (?P<items>\d+) item\(s\); "
    r"rows per stage (?P<stages>[\d >-]+?) \(layers \[(?P<layers>[\d, ]*)\]\); "
    r"average retention (?P<retention>[\d.]+)%; KV slots not written (?P<kv>\d+)"
)


@dataclass(frozen=True)
class RequestStats:
    """One ``V2Drop request ...`` line of the server log."""

    request_id: str
    vision_rows: int
    items: int
    rows_per_stage: tuple[int, ...]  # (n0, n1, ..., nS), summed over the request's items
    layers: tuple[int, ...]
    retention: float  # average share of the vision rows present per layer (0..1)
    kv_slots_not_written: int

    def describe(self) -> str:
        return (f"{self.vision_rows} vision rows in {self.items} item(s); rows kept per stage "
                f"{' -> '.join(map(str, self.rows_per_stage))} (drops before layers {list(self.layers)}); "
                f"average retention {100 * self.retention:.1f}%; KV slots not written {self.kv_slots_not_written}")


def read_log(path: str | Path) -> str:
    return Path(path).read_text(errors="replace") if Path(path).exists() else ""


def parse_request_stats(log_text: str) -> list[RequestStats]:
    """Every per-request V2Drop line of a server log, in order."""
    out = []
    for m in REQUEST_RE.finditer(log_text):
        out.append(RequestStats(
            request_id=m["id"],
            vision_rows=int(m["rows"]),
            items=int(m["items"]),
            rows_per_stage=tuple(int(x) for x in m["stages"].split("->")),
            layers=tuple(int(x) for x in m["layers"].split(",") if x.strip()),
            retention=float(m["retention"]) / 100,
            kv_slots_not_written=int(m["kv"]),
        ))
    return out


def startup_lines(log_text: str) -> list[str]:
    """The schedule / forced-settings lines V2Drop logs at start-up."""
    return [m["text"] for line in log_text.splitlines() if (m := STARTUP_RE.search(line))]


def matches(stats_id: str, response_id: str) -> bool:
    """vLLM logs the engine's request id: the response id (``chatcmpl-...``) plus a ``-suffix``."""
    return stats_id == response_id or stats_id.startswith(response_id + "-")


def stats_for(log_path: str | Path, response_id: str, timeout: float = 5.0) -> list[RequestStats]:
    """The V2Drop lines of one request (waits up to ``timeout`` s for the log to be written)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in parse_request_stats(read_log(log_path)) if matches(s.request_id, response_id)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------- demo


def ensure_demo_model(out: Path, arch: str = "llava-onevision") -> Path:
    from vllm_v2drop.dev.make_model import BUILDER_VERSION, make_model

    marker = out / "v2drop_model.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("builder_version") == BUILDER_VERSION and info.get("arch") == arch:
            return out
    return make_model(arch, out)


def chat(client, model: str, content: list[dict], max_tokens: int = 24):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0.0,
    )


def main(argv: list[str] | None = None) -> int:
    from vllm_v2drop.dev.server import serve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="model directory or name (default: build the tiny demo model)")
    parser.add_argument("--v2drop-config", default=None,
                        help='V2Drop settings, JSON (e.g. \'{"preset": "video-15"}\'); default: the model\'s preset')
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--log", default="build/demo-server.log", help="where the server log goes")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    import openai

    tiny = not args.model
    model = args.model or str(ensure_demo_model(Path("build/demo-model")))
    extra = ["--model-impl", "v2drop", "--max-model-len", "4096",
             "--limit-mm-per-prompt", '{"image": 1, "video": 1}']
    if args.v2drop_config:
        extra += ["--additional-config", json.dumps({"v2drop": json.loads(args.v2drop_config)})]
    if tiny:  # tiny float32 model on any machine: skip compilation, small KV cache
        extra += ["--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", str(256 << 20)]
    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    print(f"starting: vllm serve {model} {' '.join(extra)}", flush=True)
    print(f"(server log: {log_path})", flush=True)
    with serve(model, extra, port=args.port, log_path=log_path) as url:
        print(f"server up at {url} after {time.monotonic() - t0:.1f} s", flush=True)
        for line in startup_lines(read_log(log_path)):
            print(f"  {line}", flush=True)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY")
        requests = [
            ("image (640x480 JPEG)", [image_part(image_data_url((640, 480), fmt="JPEG")),
                                      {"type": "text", "text": "What is in this image?"}]),
            ("video (16 frames, 128x128 mp4)", [video_part(video_data_url(16, (128, 128))),
                                                {"type": "text", "text": "What happens in this video?"}]),
        ]
        for name, content in requests:
            t = time.monotonic()
            resp = chat(client, model, content, args.max_tokens)
            dt = time.monotonic() - t
            usage = resp.usage
            print(f"\n[{name}] {dt:.2f} s, {usage.prompt_tokens} prompt tokens, "
                  f"{usage.completion_tokens} generated", flush=True)
            print(f"  answer: {resp.choices[0].message.content!r}", flush=True)
            stats = stats_for(log_path, resp.id)
            if not stats:
                print("  V2Drop: no statistics logged for this request (nothing was pruned)", flush=True)
            for s in stats:
                print(f"  V2Drop: {s.describe()}", flush=True)
        print("\nstopping the server ...", flush=True)
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
