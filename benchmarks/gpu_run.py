"""Everything only a GPU can show, in one command (CUDA machine with vLLM 0.32 and this package):

    python benchmarks/gpu_run.py                 # on the GPU machine
    python benchmarks/gpu_run.py --dry-run       # anywhere: the same steps at tiny shapes

1. The GPU-only and engine checks: ``pytest -m gpu`` (FlashAttention metadata path, CUDA parity of
   the selection), identity with stock vLLM and fidelity with the reference
   (``tests/test_engine.py``) and the compiled engine (piecewise CUDA graphs on a GPU,
   ``test_compiled_engine_matches_reference``).
2. ``benchmarks/host_overhead.py`` at 1 .. 1024 running requests on the 7B LLaVA-OneVision shapes.
3. The decode-heavy serving benchmark (``benchmarks/bench_v2drop.py``, concurrency 1/16/64/256,
   both KV modes) on the same shapes.

Results go where the CPU ones go (``benchmarks/results``, named ``gpu-*``), pytest's report
beside them. ``--dry-run`` runs step 1 as ``--collect-only`` (the selected tests must exist) and
steps 2 and 3 with the tiny model, one count and one short workload, into a scratch folder:
the test suite runs it so that this script cannot rot. Each step's command is printed first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CHECKS = ["tests/test_selection.py", "tests/test_engine.py::test_identity_with_stock_vllm",
          "tests/test_engine.py::test_fidelity_with_reference", "tests/test_engine.py::test_kv_cache_holds_planned_rows",
          "tests/test_engine_robustness.py::test_compiled_engine_matches_reference"]
DECODE = [f"name=decode-c{c},images=384x384,text=8,out={out},n={n},conc={c}"
          for c, n, out in ((1, 4, 256), (16, 64, 256), (64, 128, 256), (256, 512, 256))]


def steps(out: Path, dry: bool) -> list[list[str]]:
    size = "tiny" if dry else "7b"
    model = REPO / "build" / "bench-models" / f"llava-onevision-{size}"
    cmds = [[PY, "-m", "pytest", "-q", "-rA", *CHECKS, *(["--collect-only"] if dry else
                                                         [f"--junitxml={out / 'gpu-checks.xml'}"])],
            [PY, str(REPO / "benchmarks" / "host_overhead.py"), "--arch", "llava-onevision", "--model", str(model),
             "--out", str(out), *(["--counts", "1", "--steps", "1", "--modes", "shared"] if dry else
                                  ["--dtype", "bfloat16", "--kv-cache-bytes", str(60 << 30)])]]
    # the dry run serves per_stage only (CI time): shared's command differs in one config value, and
    # tests/test_benchmark.py runs bench_v2drop.py end to end with it
    for kv in ("per_stage",) if dry else ("shared", "per_stage"):
        work = ["name=dry,images=64x64,text=8,out=4,n=1,conc=1"] if dry else DECODE
        cmds.append([PY, str(REPO / "benchmarks" / "bench_v2drop.py"), "--arch", "llava-onevision", "--size", size,
                     "--rounds", "1" if dry else "2", "--v2drop-config", json.dumps({"kv_mode": kv}),
                     *(["--stall-retries", "0"] if dry else []),
                     "--server-args", "--max-num-seqs 256", *(w for x in work for w in ("--workload", x)),
                     "--out", str(out / f"{'cpu-dry' if dry else 'gpu'}-decode-llava-onevision-{kv}.json")])
    return cmds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, into a scratch folder (CPU is fine)")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results; scratch with --dry-run)")
    args = ap.parse_args(argv)
    out = Path(args.out or (tempfile.mkdtemp(prefix="v2drop-gpu-dry-") if args.dry_run else REPO / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_run.py needs a CUDA GPU (use --dry-run to check the steps elsewhere)")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_v2drop import build_model

    build_model("llava-onevision", "tiny" if args.dry_run else "7b", REPO / "build" / "bench-models")
    failed = []
    for cmd in steps(out, args.dry_run):
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=REPO).returncode:
            failed.append(Path(cmd[1]).name if cmd[1] != "-m" else "pytest")
    print(f"results in {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
