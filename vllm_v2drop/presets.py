"""Named V2Drop schedules and their scaling to other model depths.

A preset is a schedule written for one model depth (``ref_depth``). On a model
of another depth its layers are scaled proportionally by :func:`scale_layers`.

Budget presets were derived with :func:`vllm_v2drop.core.counts.solve_keep_ratios`
on an item of 576 rows and are hard-coded here so they read plainly; the test
suite re-derives them and checks they still match.

================  =====  ===========  =================  ============================
preset            depth  layers       keep_ratios        average retention (576 rows)
================  =====  ===========  =================  ============================
llava-1.5         32     3, 17, 22    0.5, 0.5, 0.0      202.8 rows = 35.2%
llava-1.5-192     32     3, 17, 22    0.47, 0.47, 0.0    192.1 rows = 33.4%
llava-1.5-128     32     3, 17, 22    0.268, 0.268, 0.0  128.1 rows = 22.2%
llava-1.5-64      32     3, 17, 22    0.039, 0.039, 0.0   64.1 rows = 11.1%
qwen2-vl          28     3, 16, 22    0.25, 0.05, 0.0    130.3 rows = 22.6%
video-25          28     3, 16, 22    0.274, 0.274, 0.0  144.0 rows = 25.0%
video-15          28     3, 16, 22    0.09, 0.09, 0.0     86.5 rows = 15.0%
qwen3-vl          36     4, 21, 28    0.25, 0.05, 0.0    133.6 rows = 23.2%
================  =====  ===========  =================  ============================

``qwen3-vl`` is not published: no V2Drop schedule exists for Qwen3-VL. It is the
paper's Qwen2-VL schedule with its shallow / middle / deep layers scaled to
Qwen3-VL-8B's 36 layers (3, 16, 22 of 28 -> 4, 21, 28 of 36); the first stage
comes after the three layers that receive DeepStack features (0, 1, 2) at every
published depth (28 to 94 layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULT_PRESET_BY_ARCHITECTURE", "PRESETS", "Preset", "default_preset_for", "scale_layers"]


@dataclass(frozen=True)
class Preset:
    """A named schedule written for a model of ``ref_depth`` decoder layers."""

    name: str
    ref_depth: int
    layers: tuple[int, ...]
    keep_ratios: tuple[float, ...]
    source: str
    #: For budget presets, the average retention the name promises: on a model of
    #: another depth the ratios are re-solved for it on the scaled layers.
    target_retention: float | None = None


_LLAVA_LAYERS = (3, 17, 22)
_QWEN_LAYERS = (3, 16, 22)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "llava-1.5",
            32,
            _LLAVA_LAYERS,
            (0.5, 0.5, 0.0),
            "The paper's reference schedule for LLaVA-1.5-7B: 576 -> 288 -> 144 -> 1 rows, "
            "202.8 rows per layer on average (35.2%).",
        ),
        Preset(
            "llava-1.5-192",
            32,
            _LLAVA_LAYERS,
            (0.47, 0.47, 0.0),
            "The paper's 192-token budget for LLaVA-1.5 (33.3%): solve_keep_ratios(target=1/3) "
            "on the reference layers, 192.1 rows on average.",
            1 / 3,
        ),
        Preset(
            "llava-1.5-128",
            32,
            _LLAVA_LAYERS,
            (0.268, 0.268, 0.0),
            "The paper's 128-token budget for LLaVA-1.5 (22.2%): solve_keep_ratios(target=2/9) "
            "on the reference layers, 128.1 rows on average.",
            2 / 9,
        ),
        Preset(
            "llava-1.5-64",
            32,
            _LLAVA_LAYERS,
            (0.039, 0.039, 0.0),
            "The paper's 64-token budget for LLaVA-1.5 (11.1%): solve_keep_ratios(target=1/9) "
            "on the reference layers, 64.1 rows on average.",
            1 / 9,
        ),
        Preset(
            "qwen2-vl",
            28,
            _QWEN_LAYERS,
            (0.25, 0.05, 0.0),
            "The paper's schedule for Qwen2-VL-7B (28 layers): n -> n/4 -> ~1.25% of n -> 1.",
        ),
        Preset(
            "video-25",
            28,
            _QWEN_LAYERS,
            (0.274, 0.274, 0.0),
            "The paper's 25% video retention for LLaVA-OneVision-7B (Qwen2-7B LM, 28 layers): "
            "the qwen2-vl layers with ratios from solve_keep_ratios(target=0.25).",
            0.25,
        ),
        Preset(
            "video-15",
            28,
            _QWEN_LAYERS,
            (0.09, 0.09, 0.0),
            "The paper's 15% video retention for LLaVA-OneVision-7B: the qwen2-vl layers "
            "with ratios from solve_keep_ratios(target=0.15).",
            0.15,
        ),
        Preset(
            "qwen3-vl",
            36,
            (4, 21, 28),
            (0.25, 0.05, 0.0),
            "No published V2Drop schedule for Qwen3-VL: the paper's Qwen2-VL schedule (ratios 0.25, "
            "0.05, 0.0) with its layers scaled from 28 to Qwen3-VL-8B's 36 layers; the first stage "
            "follows the DeepStack layers (0-2).",
        ),
    )
}

#: The schedule used when the user gives none. LLaVA-OneVision gets the paper's
#: video setting (25%) for every item: one schedule serves a whole model, and
#: 25% is a little stricter than the paper's 33% image budget.
DEFAULT_PRESET_BY_ARCHITECTURE: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava-1.5",
    "LlavaOnevisionForConditionalGeneration": "video-25",
    "Qwen2VLForConditionalGeneration": "qwen2-vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2-vl",
    # no published schedules for these (see the README's presets rationale)
    "Qwen3VLForConditionalGeneration": "qwen3-vl",
    "Qwen3VLMoeForConditionalGeneration": "qwen3-vl",
    "LlavaNextForConditionalGeneration": "llava-1.5",
}


def default_preset_for(architecture: str) -> str | None:
    """Default preset of an architecture; a ``V2Drop`` prefix (our registered variants) is ignored."""
    return DEFAULT_PRESET_BY_ARCHITECTURE.get(architecture.removeprefix("V2Drop"))


def scale_layers(
    layers: tuple[int, ...], keep_ratios: tuple[float, ...], ref_depth: int, num_layers: int
) -> tuple[tuple[int, ...], tuple[float, ...], list[str]]:
    """Map a schedule written for ``ref_depth`` layers onto ``num_layers`` layers.

    Each layer becomes ``floor(layer * num_layers / ref_depth + 0.5)`` (round
    half up), clamped to ``[1, num_layers - 1]``; layers are then made strictly
    increasing by bumping a layer that collides with its predecessor up by
    one. A stage that no longer fits below ``num_layers`` is merged into the
    previous stage (their ratios multiply); on a 1-layer model no stage fits.

    Returns the new layers, the new ratios, and notes describing any bump or
    merge (empty when the schedule only scaled).
    """
    if num_layers == ref_depth:
        return layers, keep_ratios, []
    notes: list[str] = []
    new_layers: list[int] = []
    new_ratios: list[float] = []
    for layer, ratio in zip(layers, keep_ratios, strict=True):
        scaled = min(max(math.floor(layer * num_layers / ref_depth + 0.5), 1), num_layers - 1)
        if new_layers and scaled <= new_layers[-1]:
            bumped = new_layers[-1] + 1
            if bumped <= num_layers - 1:
                notes.append(f"layer {layer} bumped to {bumped}")
                scaled = bumped
            else:
                notes.append(f"stage at layer {layer} merged into layer {new_layers[-1]}")
                new_ratios[-1] = round(new_ratios[-1] * ratio, 9)
                continue
        if scaled < 1:  # num_layers == 1: no layer can drop
            notes.append(f"stage at layer {layer} dropped (model has a single layer)")
            continue
        new_layers.append(scaled)
        new_ratios.append(ratio)
    return tuple(new_layers), tuple(new_ratios), notes
