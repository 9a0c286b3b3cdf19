"""``vllm-v2drop`` console script."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-v2drop", description="V2Drop for vLLM: tools")
    sub = parser.add_subparsers(dest="cmd", required=True)

    mm = sub.add_parser("make-model", help="build a seeded random-weight VLM directory (no network)")
    from vllm_v2drop.dev.make_model import ARCHS

    mm.add_argument("--arch", required=True, choices=ARCHS)
    mm.add_argument("--out", required=True, help="output directory")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--size", choices=["tiny", "7b"], default="tiny")

    st = sub.add_parser("show-trace", help="draw the patches V2Drop kept per stage for one traced request")
    st.add_argument("trace", metavar="TRACE_FILE", help="a trace .jsonl file (or the trace directory)")
    st.add_argument("--request", required=True, help="request id (a prefix before vLLM's '-suffix' is enough)")
    st.add_argument("--image", action="append", default=[], help="the request's image(s), in prompt order")
    st.add_argument("--video", help="the request's video (a video file or an .npy array of frames)")
    st.add_argument("--out", required=True, help="PNG to write")
    st.add_argument("--grid", help="patch grid TxHxW (or HxW) instead of inferring it from the picture")
    st.add_argument("--cell", type=int, default=24, help="pixels per patch (default 24)")

    ag = sub.add_parser("agreement", help="what each V2Drop budget does to your own requests' answers "
                        "(teacher-forced agreement with the unpruned model)")
    ag.add_argument("--model", required=True, help="model directory or name")
    ag.add_argument("--requests", required=True, metavar="FILE.jsonl",
                    help='one OpenAI chat request per line: {"messages": [...], "max_tokens": n}')
    ag.add_argument("--budgets", default="0.5,0.35,0.25,0.15",
                    help="comma-separated target retentions (v2drop_target_retention), default 0.5,0.35,0.25,0.15")
    ag.add_argument("--png", help="draw agreement against retention into this PNG (needs matplotlib)")
    ag.add_argument("--max-tokens", type=int, default=64, help="answer length when a request gives none")
    ag.add_argument("--v2drop-config", default="{}", help="V2Drop settings (JSON), as in --additional-config")
    ag.add_argument("--dtype", default="auto")
    ag.add_argument("--max-model-len", type=int)
    ag.add_argument("--enforce-eager", action="store_true")
    ag.add_argument("--engine-args", default="{}", help="more vllm.LLM arguments (JSON object)")

    args = parser.parse_args(argv)
    if args.cmd == "agreement":
        import json

        from vllm_v2drop.agreement import run

        try:
            budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
        except ValueError:
            parser.error(f"--budgets: comma-separated numbers, got {args.budgets!r}")
        engine = {"dtype": args.dtype, **json.loads(args.engine_args)}
        if args.max_model_len:
            engine["max_model_len"] = args.max_model_len
        if args.enforce_eager:
            engine["enforce_eager"] = True
        print(run(args.model, args.requests, budgets, args.png, args.max_tokens,
                  json.loads(args.v2drop_config), engine))
        return 0
    if args.cmd == "show-trace":
        from vllm_v2drop.show_trace import show_trace

        print(show_trace(args.trace, args.request, args.image, args.video, args.out, args.grid, args.cell))
        return 0
    if args.cmd == "make-model":
        from vllm_v2drop.dev.make_model import make_model

        path = make_model(args.arch, args.out, seed=args.seed, size=args.size)
        print(path)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
