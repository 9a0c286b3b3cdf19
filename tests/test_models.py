"""The tiny-model builder: deterministic, enough vision rows, loads in transformers offline."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import ARCHS, NEW_ARCHS, NEW_VIDEO_ARCHS, VIDEO_ARCHS, make_image, make_video, prompt, video_metadata

from vllm_v2drop.dev.make_model import make_model

PLACEHOLDER = {  # (image token, video token) as they appear in the processed input ids
    "llava": ("<image>", None),
    "llava-onevision": ("<image>", "<video>"),
    "qwen2-vl": ("<|image_pad|>", "<|video_pad|>"),
    "qwen2.5-vl": ("<|image_pad|>", "<|video_pad|>"),
    "qwen3-vl": ("<|image_pad|>", "<|video_pad|>"),
    "qwen3-vl-moe": ("<|image_pad|>", "<|video_pad|>"),
    "llava-next": ("<image>", None),
}
# Vision rows per input, as the processor lays them out (the numbers reported in the docs).
EXPECTED_IMAGE_ROWS = {
    "llava": {"small": 64, "wide": 64, "large": 64},
    "llava-onevision": {"small": 336, "wide": 432, "large": 624},
    "qwen2-vl": {"small": 16, "wide": 24, "large": 48},
    "qwen2.5-vl": {"small": 16, "wide": 24, "large": 48},
    "qwen3-vl": {"small": 16, "wide": 20, "large": 35},  # 32-pixel merged patches
    "qwen3-vl-moe": {"small": 16, "wide": 20, "large": 35},
    "llava-next": {"small": 88, "wide": 70, "large": 70},  # 16 base rows + any-res tiles + newline rows
}
# Qwen3-VL: 4 temporal patches x 16 rows, with a timestamp (text rows) before each
EXPECTED_VIDEO_ROWS = {"llava-onevision": 129, "qwen2-vl": 64, "qwen2.5-vl": 64, "qwen3-vl": 64, "qwen3-vl-moe": 64}
ALL_ARCHS = ARCHS + NEW_ARCHS


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_build_is_deterministic(arch, tmp_path):
    a = _hashes(make_model(arch, tmp_path / "a", seed=0))
    b = _hashes(make_model(arch, tmp_path / "b", seed=0))
    c = _hashes(make_model(arch, tmp_path / "c", seed=1))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"] and a["config.json"] == c["config.json"]


def test_checkpoint_uses_published_key_names(tiny_models):
    from safetensors import safe_open

    def keys(arch):
        with safe_open(tiny_models[arch] / "model.safetensors", "pt") as f:
            return set(f.keys())

    for arch in ("llava", "llava-onevision"):
        k = keys(arch)
        assert any(n.startswith("vision_tower.vision_model.encoder.layers.0.") for n in k), arch
        assert "language_model.lm_head.weight" in k and "multi_modal_projector.linear_1.weight" in k
    assert "image_newline" in keys("llava-onevision")
    for arch in ("qwen2-vl", "qwen2.5-vl"):
        k = keys(arch)
        assert "lm_head.weight" in k and "model.embed_tokens.weight" in k and "visual.patch_embed.proj.weight" in k
    k = keys("llava-next")
    assert "image_newline" in k and "language_model.lm_head.weight" in k
    assert any(n.startswith("vision_tower.vision_model.encoder.layers.0.") for n in k)
    for arch in ("qwen3-vl", "qwen3-vl-moe"):  # the published Qwen3-VL names (transformers 5's own)
        k = keys(arch)
        assert {"lm_head.weight", "model.language_model.embed_tokens.weight",
                "model.visual.deepstack_merger_list.2.linear_fc2.weight"} <= k
    with safe_open(tiny_models["qwen3-vl-moe"] / "model.safetensors", "pt") as f:  # fused experts, [E, in, out]
        assert f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape() == [4, 128, 64]
        assert f.get_slice("model.language_model.layers.0.mlp.experts.down_proj").get_shape() == [4, 32, 128]


def _processed(arch: str, model_dir: Path, images=(), video=None):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    kw: dict = {}
    if images:
        kw["images"] = list(images)
    if video is not None:
        kw["videos"] = [video]
        if arch.startswith("qwen"):
            kw.update(video_metadata=[video_metadata(video)], do_sample_frames=False)
    text = prompt(model_dir, n_images=len(images), video=video is not None)
    ids = proc(text=[text], return_tensors="pt", **kw)["input_ids"][0].tolist()
    img_tok, vid_tok = PLACEHOLDER[arch]
    tok = proc.tokenizer
    n_img = ids.count(tok.convert_tokens_to_ids(img_tok))
    n_vid = ids.count(tok.convert_tokens_to_ids(vid_tok)) if vid_tok else 0
    return n_img, n_vid


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_vision_rows(arch, tiny_models):
    for name, expected in EXPECTED_IMAGE_ROWS[arch].items():
        n_img, _ = _processed(arch, tiny_models[arch], images=[make_image(name)])
        assert n_img == expected >= 16, (arch, name, n_img)
    if arch in VIDEO_ARCHS + NEW_VIDEO_ARCHS:  # also shows the (torchvision-backed) video processor working
        _, n_vid = _processed(arch, tiny_models[arch], video=make_video())
        assert n_vid == EXPECTED_VIDEO_ROWS[arch] >= 16, (arch, n_vid)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_transformers_loads_offline(arch, tiny_models):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d = tiny_models[arch]
    AutoProcessor.from_pretrained(d)
    model, info = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    cfg = model.config.get_text_config()
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (8, 128, 4, 2)
    assert cfg.hidden_size // cfg.num_attention_heads == 32
    assert next(model.parameters()).dtype == torch.float32
