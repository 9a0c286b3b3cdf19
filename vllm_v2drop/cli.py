"""``vllm-v2drop`` console script."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-v2drop", description="V2Drop for vLLM: tools")
    sub = parser.add_subparsers(dest="cmd", required=True)

    mm = sub.add_parser("make-model", help="build a seeded random-weight VLM directory (no network)")
    mm.add_argument("--arch", required=True, choices=["llava", "llava-onevision", "qwen2-vl", "qwen2.5-vl"])
    mm.add_argument("--out", required=True, help="output directory")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--size", choices=["tiny", "7b"], default="tiny")

    args = parser.parse_args(argv)
    if args.cmd == "make-model":
        from vllm_v2drop.tools.make_model import make_model

        path = make_model(args.arch, args.out, seed=args.seed, size=args.size)
        print(path)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
