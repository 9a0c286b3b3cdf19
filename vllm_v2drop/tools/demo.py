"""Demo: serve a vision-language model with vLLM and ask it about an image.

    python -m vllm_v2drop.tools.demo [MODEL]

Without MODEL it builds the tiny random LLaVA-OneVision model into
``build/demo-model`` (no network), so the answer is meaningless text; the point
is the whole path: build, ``vllm serve``, an OpenAI image chat request, clean stop.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path


def image_data_url(size: tuple[int, int] = (128, 96), seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ensure_demo_model(out: Path, arch: str = "llava-onevision") -> Path:
    from vllm_v2drop.tools.make_model import BUILDER_VERSION, make_model

    marker = out / "v2drop_model.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("builder_version") == BUILDER_VERSION and info.get("arch") == arch:
            return out
    return make_model(arch, out)


def ask(base_url: str, model: str, question: str = "What is in this image?", max_tokens: int = 32) -> str:
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY")
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url()}},
            {"type": "text", "text": question},
        ]}],
        max_tokens=max_tokens,
        temperature=0.0,
    )
    return resp.choices[0].message.content


def main(argv: list[str] | None = None) -> int:
    from vllm_v2drop.tools.server import serve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="model directory or name (default: build the tiny demo model)")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)

    model = args.model or str(ensure_demo_model(Path("build/demo-model")))
    extra = ["--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 1, "video": 0}']
    if not args.model:  # tiny float32 model on any machine: skip compilation
        extra += ["--enforce-eager", "--dtype", "float32"]
    t0 = time.monotonic()
    print(f"starting vllm serve {model} ...", flush=True)
    with serve(model, extra, port=args.port) as url:
        print(f"server up at {url} after {time.monotonic() - t0:.1f} s", flush=True)
        answer = ask(url, model)
        print(f"answer: {answer!r}", flush=True)
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
