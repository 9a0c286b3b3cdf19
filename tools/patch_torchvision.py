"""Make PyPI's torchvision wheel import next to a CPU-only torch.

torchvision's compiled ops are linked against CUDA torch libraries, so with
``torch+cpu`` they fail to load. torchvision itself copes with that, except that
``_meta_registrations.py`` registers fake kernels for ``nms``/``qnms``
unconditionally and the import dies with
"operator torchvision::nms does not exist". We guard those two registrations the
same way the file already guards the others (``extension._has_ops()``).
The pure-Python transforms that the image/video processors need then work.

Idempotent; prints what it did. Run with the venv's python.
"""

import importlib.util
import pathlib
import sys

MARK = "# patched by vllm-v2drop"
OLD = '@torch.library.register_fake("torchvision::{op}")'
NEW = (
    "@(torch.library.register_fake(\"torchvision::{op}\") if torchvision.extension._has_ops() "
    "else (lambda fn: fn))  " + MARK
)


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision not installed: nothing to patch")
        return 0
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text:
        print(f"torchvision already patched ({path})")
        return 0
    changed = text
    for op in ("nms", "qnms"):
        changed = changed.replace(OLD.format(op=op), NEW.format(op=op))
    if changed == text:
        print(f"torchvision: no unguarded registrations found in {path}")
        return 0
    path.write_text(changed)
    for pyc in (path.parent / "__pycache__").glob("_meta_registrations*.pyc"):
        pyc.unlink()
    print(f"torchvision patched for CPU-only torch ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
