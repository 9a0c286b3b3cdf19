"""V2DropConfig: parsing, every rejection's message, presets, depth scaling."""

from __future__ import annotations

import pytest

from vllm_v2drop.config import V2DropConfig, V2DropConfigError
from vllm_v2drop.core.counts import average_retention, solve_keep_ratios
from vllm_v2drop.presets import DEFAULT_PRESET_BY_ARCHITECTURE, PRESETS, scale_layers

PREFIX = """Invalid V2Drop configuration (--additional-config '{"v2drop": ...}'): """
LLAVA = "LlavaForConditionalGeneration"


def rejects(raw: dict, *fragments: str) -> str:
    with pytest.raises(V2DropConfigError) as info:
        V2DropConfig.from_additional_config({"v2drop": raw})
    msg = str(info.value)
    assert msg.startswith(PREFIX), msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ------------------------------------------------------------------ parsing


def test_defaults_when_missing():
    for additional in (None, {}, {"other": 1}, {"v2drop": None}):
        cfg = V2DropConfig.from_additional_config(additional)
        assert cfg == V2DropConfig()
    cfg = V2DropConfig()
    assert cfg.metric == "l2" and cfg.min_keep == 1 and cfg.seed == 0
    assert cfg.modalities == ["image", "video"] and cfg.kv_mode == "shared" and cfg.reference_rows == 576


def test_full_config_parses():
    cfg = V2DropConfig.from_additional_config(
        {
            "v2drop": {
                "layers": [2, 5],
                "keep_ratios": [0.5, 0],
                "metric": "cosine",
                "min_keep": 2,
                "modalities": ["video"],
                "seed": 7,
                "trace": "/tmp/v2drop-trace",
                "kv_mode": "per_stage",
            }
        }
    )
    assert cfg.keep_ratios == [0.5, 0.0] and cfg.kv_mode == "per_stage"
    r = cfg.resolve(8, "Anything")
    assert r.layers == (2, 5) and r.keep_ratios == (0.5, 0.0) and r.min_keep == 2
    assert r.metric == "cosine" and r.seed == 7 and r.num_layers == 8
    assert r.modalities == ("video",) and r.trace == "/tmp/v2drop-trace"


def test_tuples_accepted_from_python():
    assert V2DropConfig(layers=(3, 17), keep_ratios=(0.5, 0.0)).layers == [3, 17]


# ---------------------------------------------------------------- rejections


def test_unknown_key_lists_allowed_keys():
    rejects({"ratio": 0.5}, "ratio: unknown key", "allowed keys: preset, layers, keep_ratios, target_retention")


@pytest.mark.parametrize(
    "raw,fragments",
    [
        ({"layers": "3,17"}, ("layers: input should be a valid list",)),
        ({"layers": [3.5], "keep_ratios": [0.5]}, ("layers[0]: input should be a valid integer",)),
        ({"layers": [True], "keep_ratios": [0.5]}, ("layers[0]: input should be a valid integer",)),
        ({"layers": [3], "keep_ratios": ["half"]}, ("keep_ratios[0]: input should be a valid number",)),
        ({"target_retention": "0.3"}, ("target_retention: input should be a valid number",)),
        ({"min_keep": 1.5}, ("min_keep: input should be a valid integer", "allowed: an integer >= 1")),
        ({"seed": "1"}, ("seed: input should be a valid integer",)),
        ({"trace": 3}, ("trace: input should be a valid string", "a directory path")),
        ({"preset": 3}, ("preset: input should be a valid string",)),
    ],
)
def test_wrong_types(raw, fragments):
    rejects(raw, *fragments)


def test_v2drop_must_be_an_object():
    rejects(["l2"], "v2drop: must be a JSON object", "allowed keys")


def test_unsorted_and_duplicate_layers():
    rejects({"layers": [17, 3], "keep_ratios": [0.5, 0.5]}, "layers: must be sorted and without duplicates")
    rejects({"layers": [3, 3], "keep_ratios": [0.5, 0.5]}, "layers: must be sorted and without duplicates")


def test_layer_below_one():
    rejects({"layers": [0, 3], "keep_ratios": [0.5, 0.5]}, "layers: layer 0 is < 1", "allowed: ")


def test_empty_layers():
    rejects({"layers": [], "keep_ratios": []}, "layers: must not be empty")


def test_layer_beyond_model_depth():
    cfg = V2DropConfig(layers=[3, 32], keep_ratios=[0.5, 0.0])
    with pytest.raises(V2DropConfigError) as info:
        cfg.resolve(32, LLAVA)
    msg = str(info.value)
    assert msg.startswith(PREFIX)
    assert "layers: layer 32 does not exist in a model with 32 layers" in msg and "allowed:" in msg
    assert cfg.resolve(33, LLAVA).layers == (3, 32)


@pytest.mark.parametrize("ratios", [[1.5], [-0.1]])
def test_ratio_out_of_range(ratios):
    rejects({"layers": [3], "keep_ratios": ratios}, "keep_ratios: every ratio must lie in [0, 1]", "allowed:")


def test_length_mismatch():
    rejects({"layers": [3, 17], "keep_ratios": [0.5]}, "keep_ratios: has 1 ratios but layers has 2 layers")
    rejects(
        {"preset": "llava-1.5", "keep_ratios": [0.5]},
        "keep_ratios: has 1 ratios but preset 'llava-1.5' has 3 layers",
    )


def test_keep_ratios_and_target_together():
    rejects(
        {"layers": [3], "keep_ratios": [0.5], "target_retention": 0.3},
        "keep_ratios, target_retention: give one of them, not both",
    )


@pytest.mark.parametrize("target", [0, 0.0, -0.2, 1.01])
def test_target_out_of_range(target):
    rejects(
        {"target_retention": target}, "target_retention: must lie in (0, 1]", "allowed: null or a number in (0, 1]"
    )


def test_unknown_preset_lists_presets():
    rejects({"preset": "llava"}, "preset: unknown preset 'llava'", "allowed: null or one of: " + ", ".join(PRESETS))


def test_keep_ratios_without_layers():
    rejects({"keep_ratios": [0.5, 0.5, 0.0]}, "keep_ratios: needs layers (or a preset")


def test_layers_without_ratios():
    rejects({"layers": [3, 17]}, "layers: need keep_ratios or target_retention")


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (
            {"metric": "l3"},
            "metric: unknown metric 'l3' (allowed: l2, l1, cosine, random, none)",
        ),
        ({"kv_mode": "paged"}, "kv_mode: input should be 'shared' or 'per_stage'"),
        ({"modalities": ["audio"]}, "modalities[0]: input should be 'image' or 'video'"),
        ({"modalities": []}, "modalities: got []"),
        ({"modalities": ["image", "image"]}, "modalities: got ['image', 'image']"),
        ({"min_keep": 0}, "min_keep: must be >= 1, got 0"),
        ({"reference_rows": 0}, "reference_rows: must be >= 1, got 0"),
    ],
)
def test_enum_and_range_fields(raw, fragment):
    rejects(raw, fragment)


def test_unknown_architecture_without_schedule():
    with pytest.raises(V2DropConfigError, match="architecture 'MysteryVLM' has no default schedule"):
        V2DropConfig().resolve(32, "MysteryVLM")


def test_direct_construction_raises_config_error():
    with pytest.raises(V2DropConfigError, match="metric"):
        V2DropConfig(metric="max")
    assert issubclass(V2DropConfigError, ValueError)


# --------------------------------------------------------------- resolution


def test_defaults_per_architecture():
    expected = {
        "LlavaForConditionalGeneration": ("llava-1.5", 32),
        "LlavaOnevisionForConditionalGeneration": ("video-25", 28),
        "Qwen2VLForConditionalGeneration": ("qwen2-vl", 28),
        "Qwen2_5_VLForConditionalGeneration": ("qwen2-vl", 28),
        "Qwen3VLForConditionalGeneration": ("qwen3-vl", 36),
        "Qwen3VLMoeForConditionalGeneration": ("qwen3-vl", 36),
        "LlavaNextForConditionalGeneration": ("llava-1.5", 32),
    }
    assert {a: p for a, (p, _) in expected.items()} == DEFAULT_PRESET_BY_ARCHITECTURE
    for arch, (name, depth) in expected.items():
        for prefix in ("", "V2Drop"):
            r = V2DropConfig().resolve(depth, prefix + arch)
            assert r.layers == PRESETS[name].layers and r.keep_ratios == PRESETS[name].keep_ratios
            assert f"preset '{name}'" in r.description


def test_qwen3_vl_preset_first_stage_after_deepstack():
    """Qwen3-VL's default drops after the DeepStack layers (0-2) at every published depth (2B .. 235B)."""
    for depth in (28, 36, 48, 64, 94):
        r = V2DropConfig().resolve(depth, "Qwen3VLMoeForConditionalGeneration")
        assert len(r.layers) == 3 and r.layers[0] >= 3, (depth, r.layers)


def test_reference_schedule_resolves():
    r = V2DropConfig(preset="llava-1.5").resolve(32, LLAVA)
    assert (r.layers, r.keep_ratios) == ((3, 17, 22), (0.5, 0.5, 0.0))
    assert r.achieved_retention == pytest.approx(0.352, abs=5e-4)
    assert "35.2%" in r.description and "202.8 of 576" in r.description


@pytest.mark.parametrize(
    "name,target",
    [
        ("llava-1.5-192", 1 / 3),
        ("llava-1.5-128", 2 / 9),
        ("llava-1.5-64", 1 / 9),
        ("video-25", 0.25),
        ("video-15", 0.15),
    ],
)
def test_budget_presets_rederive(name, target):
    p = PRESETS[name]
    ratios, achieved = solve_keep_ratios(p.layers, p.ref_depth, target)
    assert ratios == p.keep_ratios
    assert abs(achieved - target) * 576 <= 1.0
    assert p.source and p.target_retention == pytest.approx(target)


@pytest.mark.parametrize("name", ["llava-1.5-128", "video-25", "video-15"])
@pytest.mark.parametrize("depth", [8, 16, 40])
def test_budget_presets_keep_their_budget_at_other_depths(name, depth):
    """Scaled layers alone would change the average; the ratios are re-solved for the preset's budget."""
    r = V2DropConfig(preset=name).resolve(depth, "Qwen2VLForConditionalGeneration")
    assert abs(r.achieved_retention - PRESETS[name].target_retention) * 576 <= 1.0
    assert f"scaled to {depth}, keep_ratios solved for target_retention" in r.description


def test_paper_schedule_presets_keep_their_ratios_when_scaled():
    r = V2DropConfig(preset="llava-1.5").resolve(8, "LlavaForConditionalGeneration")
    assert (r.layers, r.keep_ratios) == ((1, 4, 6), (0.5, 0.5, 0.0))


def test_all_presets_valid():
    for p in PRESETS.values():
        assert len(p.layers) == len(p.keep_ratios) and p.layers[-1] < p.ref_depth
        assert 0 < average_retention(576, p.layers, p.keep_ratios, p.ref_depth) < 1


def test_target_retention_with_preset_layers_and_default():
    r = V2DropConfig(preset="llava-1.5", target_retention=0.222).resolve(32, LLAVA)
    assert r.layers == (3, 17, 22) and abs(r.achieved_retention - 0.222) * 576 <= 1
    assert "target_retention 0.222" in r.description
    r = V2DropConfig(target_retention=0.333).resolve(32, LLAVA)  # default preset's layers
    assert abs(r.achieved_retention * 576 - 192) <= 1
    r = V2DropConfig(layers=[2, 6], target_retention=0.5).resolve(12, "Anything")
    assert r.layers == (2, 6) and abs(r.achieved_retention - 0.5) * 576 <= 1


def test_preset_with_keep_ratio_override():
    r = V2DropConfig(preset="qwen2-vl", keep_ratios=[0.5, 0.5, 0.0]).resolve(28, "x")
    assert r.layers == (3, 16, 22) and r.keep_ratios == (0.5, 0.5, 0.0)


def test_depth_scaling_llava_on_8_layers():
    r = V2DropConfig(preset="llava-1.5").resolve(8, LLAVA)
    assert r.layers == (1, 4, 6) and r.keep_ratios == (0.5, 0.5, 0.0)
    assert all(a < b for a, b in zip(r.layers, r.layers[1:])) and r.layers[-1] < 8
    assert "written for 32 layers, scaled to 8" in r.description
    assert r.achieved_retention == average_retention(576, r.layers, r.keep_ratios, 8)


@pytest.mark.parametrize("depth", range(1, 65))
def test_depth_scaling_always_valid(depth):
    for p in PRESETS.values():
        layers, ratios, notes = scale_layers(p.layers, p.keep_ratios, p.ref_depth, depth)
        assert len(layers) == len(ratios)
        assert all(1 <= layer < depth for layer in layers)
        assert all(a < b for a, b in zip(layers, layers[1:]))
        if len(layers) < len(p.layers):
            assert notes


def test_depth_scaling_bumps_and_merges():
    assert scale_layers((3, 4, 5), (0.5, 0.5, 0.5), 32, 8)[:2] == ((1, 2, 3), (0.5, 0.5, 0.5))
    layers, ratios, notes = scale_layers((3, 17, 22), (0.5, 0.5, 0.0), 32, 3)
    assert layers == (1, 2) and ratios == (0.5, 0.0) and any("merged" in n for n in notes)
    r = V2DropConfig(preset="llava-1.5").resolve(2, LLAVA)
    assert r.layers == (1,) and r.keep_ratios == (0.0,) and "merged into layer 1" in r.description
    r = V2DropConfig(preset="llava-1.5").resolve(1, LLAVA)
    assert r.layers == () and r.achieved_retention == 1.0


def test_metric_none_drops_nothing():
    r = V2DropConfig(metric="none").resolve(32, LLAVA)
    assert r.layers == () and r.keep_ratios == () and r.achieved_retention == 1.0
    assert "nothing is dropped" in r.description


def test_resolved_plan_helper():
    r = V2DropConfig().resolve(32, LLAVA)
    plan = r.plan([range(1, 577)], 600)
    assert plan.counts.tolist() == [[576, 288, 144, 1]]
    assert plan.rows_per_layer(r.layers, r.num_layers)[0] == 576
