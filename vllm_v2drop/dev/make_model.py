"""Build seeded random-weight vision-language models that need no network.

``make_model(arch, out, seed, size)`` writes a directory that both transformers
(``AutoProcessor`` + ``AutoModelForImageTextToText``) and vLLM load offline:

* the real transformers config class of the architecture, scaled down for
  ``size="tiny"`` (tests, float32) or with the published 7B shapes for
  ``size="7b"`` (GPU benchmarks, bfloat16);
* a byte-level BPE tokenizer trained locally on a fixed corpus, holding the
  model's real special tokens;
* the model's real image (and video) processor configuration, scaled to the
  vision tower, and a chat template in the real model's style;
* weights drawn from a generator seeded per tensor, written with safetensors
  under the *published checkpoint key names* (transformers 5 would write
  ``vision_tower.embeddings.*`` for CLIP/SigLIP towers, which vLLM 0.32 does not
  map; the published ``vision_tower.vision_model.*`` names load in both).

Same arguments give the same bytes.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

BUILDER_VERSION = 1
ARCHS = ("llava", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "llava-next")
SIZES = ("tiny", "7b")

# -------------------------------------------------------------------------------------------------
# Tokenizer

_CORPUS_WORDS = (
    "the a an of and to in is it that this with for on as at by from be are was were image video "
    "picture photo frame scene shows describe what color red green blue yellow black white cat dog "
    "bird car tree house road sky water person people man woman child left right top bottom middle "
    "small large big little many one two three four five six seven eight nine ten first second "
    "there here where when who which how why question answer yes no user assistant system helpful "
    "you are please look carefully tell me about object objects background foreground light dark "
    "number count text sign table chair window door wall floor grass flower moving still time "
    "token tokens vision language model drop lazy layer change between"
).split()


def _corpus() -> list[str]:
    """A fixed, deterministic training corpus (no randomness, no files)."""
    lines, n = [], len(_CORPUS_WORDS)
    for i in range(400):
        words = [_CORPUS_WORDS[(i * 7 + j * (i % 13 + 1)) % n] for j in range(12 + i % 9)]
        line = " ".join(words).capitalize() + (". " if i % 3 else "? ") + str(i)
        lines.append(line)
    return lines


_SPECIALS = {
    # arch -> (special tokens in id order, bos, eos, pad, unk)
    "llava": (["<unk>", "<s>", "</s>", "<pad>", "<image>"], "<s>", "</s>", "<pad>", "<unk>"),
    "llava-onevision": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        None, "<|im_end|>", "<|endoftext|>", None,
    ),
    "qwen2-vl": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
         "<|image_pad|>", "<|video_pad|>"],
        None, "<|im_end|>", "<|endoftext|>", None,
    ),
}
_SPECIALS["qwen2.5-vl"] = _SPECIALS["qwen3-vl"] = _SPECIALS["qwen3-vl-moe"] = _SPECIALS["qwen2-vl"]
_SPECIALS["llava-next"] = _SPECIALS["llava"]


def _make_tokenizer(arch: str, chat_template: str, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, unk = _SPECIALS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if bos is not None:  # Llama tokenizers prepend BOS
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kw = {k: v for k, v in dict(bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk).items() if v}
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=chat_template, **kw)
    hf_tok.model_max_length = 32768
    return hf_tok


# -------------------------------------------------------------------------------------------------
# Chat templates (the published models' templates)

LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

OV_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's template: Qwen2-VL's without the default system message.
QWEN3_TEMPLATE = QWEN_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", "")

# -------------------------------------------------------------------------------------------------
# Configs and processors


def _text_dims(size: str, arch: str) -> dict:
    if size == "tiny":
        return dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=8192, initializer_range=0.1)
    if arch == "qwen3-vl":  # Qwen3-VL-8B
        return dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=262144)
    if arch == "qwen3-vl-moe":  # Qwen3-VL-30B-A3B
        return dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                    num_key_value_heads=4, max_position_embeddings=262144)
    if arch in ("llava", "llava-next"):  # Vicuna-7B (Llama-2 shape)
        return dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, max_position_embeddings=4096)
    return dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=32768)  # Qwen2-7B


def _clip_llama(T, img: int, tiny: bool, n_vocab: int, text: dict, common: dict):
    """CLIP vision tower + Llama text config of LLaVA-1.5 and LLaVA-NeXT (Vicuna)."""
    vision = T.CLIPVisionConfig(
        **(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                image_size=img, patch_size=8, projection_dim=64, initializer_range=0.1) if tiny else
           dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=img, patch_size=14, projection_dim=768)),
        hidden_act="quick_gelu")
    text_cfg = T.LlamaConfig(vocab_size=n_vocab if tiny else 32064, rms_norm_eps=1e-5,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **text, **common)
    return vision, text_cfg


def _build(arch: str, size: str, tok):
    """Return (model class, config, processor) for ``arch`` / ``size``."""
    import transformers as T

    tiny = size == "tiny"
    ids = tok.convert_tokens_to_ids
    n_vocab = len(tok)
    text = _text_dims(size, arch)
    common = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    if arch == "llava":
        img = 64 if tiny else 336
        vision, text_cfg = _clip_llama(T, img, tiny, n_vocab, text, common)
        n_img = (vision.image_size // vision.patch_size) ** 2
        cfg = T.LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_index=ids("<image>"),
                            image_seq_length=n_img, vision_feature_layer=-2,
                            vision_feature_select_strategy="default", projector_hidden_act="gelu",
                            tie_word_embeddings=False, **common)
        ip = T.CLIPImageProcessor(size={"shortest_edge": img}, crop_size={"height": img, "width": img},
                                  do_center_crop=True, resample=3)
        proc = T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=vision.patch_size,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                chat_template=LLAVA_TEMPLATE)
        return T.LlavaForConditionalGeneration, cfg, proc

    if arch == "llava-onevision":
        img = 64 if tiny else 384
        vision = T.SiglipVisionConfig(
            **(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    image_size=img, patch_size=8, initializer_range=0.1) if tiny else
               dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                    image_size=img, patch_size=14)),
            hidden_act="gelu_pytorch_tanh", vision_use_head=False, layer_norm_eps=1e-6)
        text_cfg = T.Qwen2Config(vocab_size=n_vocab if tiny else 152128, rms_norm_eps=1e-6,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                 tie_word_embeddings=False, **text, **common)
        pinpoints = [[img * i, img * j] for i in range(1, 7) for j in range(1, 7)]
        cfg = T.LlavaOnevisionConfig(vision_config=vision, text_config=text_cfg,
                                     image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                     vision_feature_layer=-1, vision_feature_select_strategy="full",
                                     image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
                                     projector_hidden_act="gelu", tie_word_embeddings=False, **common)
        half = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        ip = T.LlavaOnevisionImageProcessor(size={"height": img, "width": img}, image_grid_pinpoints=pinpoints,
                                            do_pad=True, **half)
        vp = T.LlavaOnevisionVideoProcessor(size={"height": img, "width": img}, **half)
        proc = T.LlavaOnevisionProcessor(image_processor=ip, video_processor=vp, tokenizer=tok,
                                         num_image_tokens=(img // vision.patch_size) ** 2,
                                         vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                         chat_template=OV_TEMPLATE)
        return T.LlavaOnevisionForConditionalGeneration, cfg, proc

    if arch == "llava-next":  # LLaVA-NeXT (v1.6, Vicuna): CLIP tiles at any resolution + image_newline
        img = 32 if tiny else 336
        vision, text_cfg = _clip_llama(T, img, tiny, n_vocab, text, common)
        pinpoints = [[img, 2 * img], [2 * img, img], [2 * img, 2 * img], [3 * img, img], [img, 3 * img]]
        cfg = T.LlavaNextConfig(vision_config=vision, text_config=text_cfg, image_token_index=ids("<image>"),
                                image_seq_length=(img // vision.patch_size) ** 2, vision_feature_layer=-2,
                                vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
                                projector_hidden_act="gelu", tie_word_embeddings=False, **common)
        ip = T.LlavaNextImageProcessor(size={"shortest_edge": img}, crop_size={"height": img, "width": img},
                                       image_grid_pinpoints=pinpoints, do_pad=True, resample=3)
        proc = T.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=vision.patch_size,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                    chat_template=LLAVA_TEMPLATE)
        return T.LlavaNextForConditionalGeneration, cfg, proc

    if arch in ("qwen3-vl", "qwen3-vl-moe"):  # DeepStack vision tower, interleaved M-RoPE, video timestamps
        moe = arch == "qwen3-vl-moe"
        head_dim = text["hidden_size"] // text["num_attention_heads"] if tiny else 128
        rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                "mrope_section": [6, 5, 5] if tiny else [24, 20, 20]}  # sums to head_dim / 2
        text_cfg = dict(vocab_size=n_vocab if tiny else 151936, rms_norm_eps=1e-6, head_dim=head_dim,
                        rope_parameters=rope, **text, **common)
        if moe:
            text_cfg.update(moe_intermediate_size=32 if tiny else 768, num_experts=4 if tiny else 128,
                            num_experts_per_tok=2 if tiny else 8, decoder_sparse_step=1, norm_topk_prob=True)
        # tiny: 3 tower blocks, each feeding DeepStack (LLM layers 0, 1, 2 get visual features added)
        vision = (dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, num_position_embeddings=256,
                       deepstack_visual_indexes=[0, 1, 2], initializer_range=0.1) if tiny else
                  dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                       num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]))
        vision.update(hidden_act="gelu_pytorch_tanh", patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      out_hidden_size=text["hidden_size"])
        cls, cfg_cls = ((T.Qwen3VLMoeForConditionalGeneration, T.Qwen3VLMoeConfig) if moe else
                        (T.Qwen3VLForConditionalGeneration, T.Qwen3VLConfig))
        cfg = cfg_cls(vision_config=vision, text_config=text_cfg, image_token_id=ids("<|image_pad|>"),
                      video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                      vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False, **common)
        # tiny: 112x112 -> 16 rows, 160x120 -> 20, 224x168 -> 35; an 8-frame 64x64 video -> 4 x 16 rows
        img_px = (64 * 64, 448 * 448) if tiny else (64 * 32 * 32, 16384 * 32 * 32)
        half = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        ip = T.Qwen2VLImageProcessor(size={"shortest_edge": img_px[0], "longest_edge": img_px[1]}, patch_size=16,
                                     merge_size=2, temporal_patch_size=2, **half)
        vp = T.Qwen3VLVideoProcessor(size={"shortest_edge": 128 * 32 * 32, "longest_edge": (256 if tiny else 768)
                                           * 32 * 32}, patch_size=16, merge_size=2, temporal_patch_size=2, fps=2,
                                     **half)
        proc = T.Qwen3VLProcessor(image_processor=ip, video_processor=vp, tokenizer=tok, chat_template=QWEN3_TEMPLATE)
        return cls, cfg, proc

    # Qwen2-VL / Qwen2.5-VL
    q25 = arch == "qwen2.5-vl"
    mrope = [4, 6, 6] if tiny else [16, 24, 24]  # sums to head_dim / 2
    text_cfg = dict(vocab_size=n_vocab if tiny else 152064, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1000000.0},
                    **text, **common)
    if q25 and not tiny:
        text_cfg["max_position_embeddings"] = 128000
    if q25:
        vision = (dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                       window_size=112, fullatt_block_indexes=[1], initializer_range=0.1) if tiny else
                  dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31]))
        vision.update(hidden_act="silu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      tokens_per_second=2)
        cls, cfg_cls, proc_cls = (T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLConfig,
                                  T.Qwen2_5_VLProcessor)
    else:
        vision = (dict(depth=2, embed_dim=64, num_heads=2, hidden_size=128, initializer_range=0.1) if tiny else
                  dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=3584))
        vision.update(hidden_act="quick_gelu", mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        cls, cfg_cls, proc_cls = T.Qwen2VLForConditionalGeneration, T.Qwen2VLConfig, T.Qwen2VLProcessor
    cfg = cfg_cls(vision_config=vision, text_config=text_cfg, image_token_id=ids("<|image_pad|>"),
                  video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                  vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False, **common)
    # tiny: a 112x112 image gives 8x8 patches -> 16 rows; at most 448x448 -> 256 rows.
    img_px = (56 * 56, 448 * 448) if tiny else (56 * 56, 28 * 28 * 1280)
    vid_px = (112 * 112, 224 * 224) if tiny else (128 * 28 * 28, 768 * 28 * 28)
    ip = T.Qwen2VLImageProcessor(min_pixels=img_px[0], max_pixels=img_px[1], patch_size=14, merge_size=2,
                                 temporal_patch_size=2)
    vp = T.Qwen2VLVideoProcessor(min_pixels=vid_px[0], max_pixels=vid_px[1], patch_size=14, merge_size=2,
                                 temporal_patch_size=2)
    proc = proc_cls(image_processor=ip, video_processor=vp, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    return cls, cfg, proc


# -------------------------------------------------------------------------------------------------
# Weights


def checkpoint_name(arch: str, name: str) -> str:
    """transformers-5 parameter name -> the published checkpoint's key (what vLLM 0.32 maps)."""
    if arch.startswith("qwen3"):  # transformers 5 names are the published ones, except fused experts
        return name
    if arch in ("llava", "llava-onevision", "llava-next"):
        for old, new in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                         ("model.vision_tower.", "vision_tower.vision_model."),
                         ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("model.image_newline", "image_newline")):
            if name.startswith(old):
                return new + name[len(old):]
    else:
        for old, new in (("model.language_model.", "model."), ("model.visual.", "visual.")):
            if name.startswith(old):
                return new + name[len(old):]
    return name


def _param_specs(cls, cfg):
    """(name, shape, kind) of every parameter, from a model built on the meta device."""
    import torch

    with torch.device("meta"):
        model = cls(cfg)
    specs = []
    for mod_name, mod in model.named_modules():
        is_norm = "norm" in type(mod).__name__.lower()
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            kind = ("one" if p_name == "weight" else "zero") if is_norm else ("bias" if p_name.endswith("bias") else "w")
            specs.append((full, tuple(p.shape), kind))
    return sorted(specs)


# q/k weights get twice the std: sharper attention, so generations depend on their context and do not
# settle on one repeated token.
_SHARP, _QK_SCALE = ("q_proj", "k_proj"), 2.0
_FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _tensor(name: str, shape, kind: str, seed: int, std: float, dtype):
    import torch

    if kind == "one":
        return torch.ones(shape, dtype=dtype)
    if kind == "zero":
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if kind == "w" and any(k in name for k in _SHARP):
        std = std * _QK_SCALE
    t = torch.randn(shape, generator=g, dtype=torch.float32) * (std if kind == "w" else std / 4)
    return t.to(dtype)


def _write_weights(arch: str, cls, cfg, out: Path, seed: int, std: float, dtype, shard_bytes: int):
    specs = _param_specs(cls, cfg)
    shards, cur, cur_bytes = [], {}, 0
    for name, shape, kind in specs:
        t = _tensor(name, shape, kind, seed, std, dtype)
        if name.endswith(_FUSED_EXPERTS):  # published Qwen3-VL-MoE layout: [experts, in, out]
            t = t.transpose(1, 2).contiguous()
        cur[checkpoint_name(arch, name)] = t
        cur_bytes += t.numel() * t.element_size()
        if cur_bytes >= shard_bytes:
            shards.append(_flush(cur, out, len(shards)))
            cur, cur_bytes = {}, 0
    if cur:
        shards.append(_flush(cur, out, len(shards)))
    if len(shards) == 1:
        (out / shards[0][0]).rename(out / "model.safetensors")
        return
    n = len(shards)
    weight_map, total = {}, 0
    for i, (fname, keys, nbytes) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out / fname).rename(out / final)
        weight_map.update({k: final for k in keys})
        total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _flush(tensors: dict, out: Path, i: int):
    from safetensors.torch import save_file

    fname = f"shard-{i}.tmp.safetensors"
    save_file(tensors, str(out / fname), metadata={"format": "pt"})
    return fname, sorted(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


# -------------------------------------------------------------------------------------------------


def make_model(arch: str, out: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Build ``arch`` (one of ``ARCHS``) with seeded random weights into ``out``; return the path."""
    import torch
    from transformers import GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {SIZES}")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    template = {"llava": LLAVA_TEMPLATE, "llava-next": LLAVA_TEMPLATE, "llava-onevision": OV_TEMPLATE,
                "qwen3-vl": QWEN3_TEMPLATE, "qwen3-vl-moe": QWEN3_TEMPLATE}.get(arch, QWEN_TEMPLATE)
    tok = _make_tokenizer(arch, template)
    cls, cfg, proc = _build(arch, size, tok)
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    cfg.architectures = [cls.__name__]
    cfg.dtype = dtype
    cfg.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    proc.save_pretrained(out)
    std = 0.1 if size == "tiny" else 0.02
    _write_weights(arch, cls, cfg, out, seed, std, dtype, shard_bytes=4 << 30)
    (out / "v2drop_model.json").write_text(json.dumps(
        {"arch": arch, "size": size, "seed": seed, "builder_version": BUILDER_VERSION}, indent=2) + "\n")
    return out
