"""Write a JSONL file of chat requests for ``vllm-v2drop agreement``: synthetic images (and
videos) of several sizes with a few kinds of question, as data URLs (one self-contained file).

    python benchmarks/agreement_requests.py -n 16 --videos 4 --out requests.jsonl
    vllm-v2drop agreement --model MODEL --requests requests.jsonl --png curve.png
"""

from __future__ import annotations

import argparse
import json

from vllm_v2drop.dev.demo import image_data_url, image_part, video_data_url, video_part

QUESTIONS = ("Describe this picture in detail.", "What colours do you see?", "Is there any text in it?",
             "Count the objects.", "What is in the top left corner?")
SIZES = ((448, 336), (336, 336), (640, 480), (224, 168))


def requests(n: int, videos: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        part = (video_part(video_data_url(frames=8, size=(128, 128), seed=100 + i)) if i < videos
                else image_part(image_data_url(SIZES[i % len(SIZES)], seed=i)))
        text = "What happens in this video?" if i < videos else QUESTIONS[i % len(QUESTIONS)]
        out.append({"messages": [{"role": "user", "content": [part, {"type": "text", "text": text}]}],
                    "max_tokens": max_tokens})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=16, help="requests in all")
    p.add_argument("--videos", type=int, default=0, help="how many of them are videos")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    with open(a.out, "w") as f:
        for r in requests(a.n, a.videos, a.max_tokens):
            f.write(json.dumps(r) + "\n")
    print(f"wrote {a.n} requests to {a.out}")


if __name__ == "__main__":
    main()
