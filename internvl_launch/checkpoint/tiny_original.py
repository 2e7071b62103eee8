"""Tiny random checkpoints in OpenGVLab's original `InternVLChatModel` layout.

The test bed for conversion: the config.json and tensor names that the
original modeling code reads, for each language-model backbone it supports
(Qwen2, InternLM2, Llama, Phi-3; and InternVL3.5's Qwen3, Qwen3-MoE and
GPT-OSS) and both vision towers (InternViT-300M style: LayerNorm, qkv bias;
InternViT-6B style: RMSNorm, query/key normalisation, no qkv bias). Written from shapes alone, with no model class, so nothing here
depends on the converter it tests.

Values are drawn from a seeded generator at scales that make every tensor
matter to the output (norm weights around 1, layer scales around 0.5), so that
a wrongly split or misplaced tensor changes the logits far beyond float32 noise.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Bump when the generated files change.
ORIGINAL_GENERATOR_VERSION = 1

#: Each backbone's template, as its InternVL2-era checkpoints name them (the
#: InternVL3.5 backbones: `internvl2_5`, which the Qwen3 ones use; see
#: docs/conversion.md for GPT-OSS's own template).
BACKBONE_TEMPLATES = {
    "qwen2": "internvl2_5",
    "internlm2": "internlm2-chat",
    "llama": "Hermes-2",
    "phi3": "phi3-chat",
    "qwen3": "internvl2_5",
    "qwen3_moe": "internvl2_5",
    "gpt_oss": "internvl2_5",
}
_LLM_ARCH = {
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "internlm2": ("InternLM2ForCausalLM", "internlm2"),
    "llama": ("LlamaForCausalLM", "llama"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "gpt_oss": ("GptOssForCausalLM", "gpt_oss"),
}
#: The InternVL3.5 backbones (Transformers >= 4.55 classes, which the
#: original code builds with `AutoModelForCausalLM.from_config`).
INTERNVL3_5_BACKBONES = ("qwen3", "qwen3_moe", "gpt_oss")
#: Mixture-of-experts shape of the tiny Qwen3-MoE and GPT-OSS checkpoints:
#: experts, experts per token, and each expert's width as a fraction of
#: `text_intermediate`. Constants rather than config fields, so that the
#: older backbones' configs (and their keys) stay as they were.
MOE_EXPERTS = 4
MOE_TOP_K = 2
MOE_WIDTH_DIVISOR = 4
#: GPT-OSS's sliding window in the tiny checkpoint: shorter than the fidelity
#: prompt (523 tokens), so its sliding-attention layer sees a cut-off window.
GPT_OSS_SLIDING_WINDOW = 64


@dataclass(frozen=True)
class TinyOriginalConfig:
    """Dimensions of a tiny original-layout checkpoint."""

    backbone: str = "qwen2"  # qwen2 | internlm2 | llama | phi3 | qwen3 | qwen3_moe | gpt_oss
    vision_style: str = "300m"  # 300m (LayerNorm, qkv bias) | 6b (RMSNorm, qk norm, no qkv bias)
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 256
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vocab_target: int = 1000
    seed: int = 0
    ps_version: str = "v2"
    max_dynamic_patch: int = 12
    #: Embedding rows when larger than the tokenizer (real vocabularies, for benchmarks).
    model_vocab: int | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16

    @property
    def template(self) -> str:
        return BACKBONE_TEMPLATES[self.backbone]

    def key(self) -> str:
        blob = json.dumps({"v": ORIGINAL_GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def vision_config(c: TinyOriginalConfig) -> dict[str, Any]:
    big = c.vision_style == "6b"
    return {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": c.vision_hidden,
        "num_hidden_layers": c.vision_layers,
        "num_attention_heads": c.vision_heads,
        "intermediate_size": c.vision_intermediate,
        "image_size": 448,
        "patch_size": 14,
        "num_channels": 3,
        "qkv_bias": not big,
        "qk_normalization": big,
        "norm_type": "rms_norm" if big else "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "use_flash_attn": False,
        "initializer_factor": 0.1,
        "initializer_range": 0.02,
    }


def llm_config(c: TinyOriginalConfig, vocab: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    arch, model_type = _LLM_ARCH[c.backbone]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": c.text_hidden,
        "intermediate_size": c.text_intermediate,
        "num_hidden_layers": c.text_layers,
        "num_attention_heads": c.text_heads,
        "num_key_value_heads": c.text_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "attn_implementation": "eager",
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if c.backbone == "internlm2":
        out["bias"] = False
        out["auto_map"] = {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        }
    if c.backbone == "phi3":
        out["original_max_position_embeddings"] = 4096
        out["sliding_window"] = 4095
        out["embd_pdrop"] = out["resid_pdrop"] = out["attention_dropout"] = 0.0
    if c.backbone == "qwen2":
        out["use_sliding_window"] = False
        out["sliding_window"] = 4096
        out["max_window_layers"] = c.text_layers
    if c.backbone in INTERNVL3_5_BACKBONES:
        out.update(_internvl3_5_llm(c))
    return out


def _internvl3_5_llm(c: TinyOriginalConfig) -> dict[str, Any]:
    """The keys Qwen3, Qwen3-MoE and GPT-OSS configs add (as Transformers 4.55
    writes them). The Qwen3 checkpoint ties its output head to the embeddings,
    as Qwen3-0.6B/1.7B/4B do; the other two do not."""
    out: dict[str, Any] = {"head_dim": c.text_hidden // c.text_heads, "attention_dropout": 0.0}
    if c.backbone in ("qwen3", "qwen3_moe"):
        out.update(
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=c.text_layers,
            layer_types=["full_attention"] * c.text_layers,
            rope_theta=1000000.0,
        )
    if c.backbone == "qwen3":
        out["tie_word_embeddings"] = True
    if c.backbone == "qwen3_moe":
        out.update(
            num_experts=MOE_EXPERTS,
            num_experts_per_tok=MOE_TOP_K,
            moe_intermediate_size=c.text_intermediate // MOE_WIDTH_DIVISOR,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        )
    if c.backbone == "gpt_oss":
        out.update(
            intermediate_size=c.text_intermediate // MOE_WIDTH_DIVISOR,
            num_local_experts=MOE_EXPERTS,
            num_experts_per_tok=MOE_TOP_K,
            experts_per_token=MOE_TOP_K,
            attention_bias=True,
            sliding_window=GPT_OSS_SLIDING_WINDOW,
            layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(c.text_layers)],
            rms_norm_eps=1e-5,
            rope_theta=150000.0,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 4096,
            },
            initial_context_length=4096,
            max_position_embeddings=131072,
            swiglu_limit=7.0,
            output_router_logits=False,
            router_aux_loss_coef=0.9,
        )
    return out


def original_config(c: TinyOriginalConfig, vocab: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "vision_config": vision_config(c),
        "llm_config": llm_config(c, vocab, eos_id, pad_id),
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "max_dynamic_patch": c.max_dynamic_patch,
        "min_dynamic_patch": 1,
        "ps_version": c.ps_version,
        "select_layer": -1,
        "template": c.template,
        "use_thumbnail": True,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "pad2square": False,
        "torch_dtype": "float32",
    }


def tensor_shapes(c: TinyOriginalConfig, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the original layout and its shape."""
    d, vi = c.vision_hidden, c.vision_intermediate
    big = c.vision_style == "6b"
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, d),
        "vision_model.embeddings.patch_embedding.weight": (d, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (d,),
        "vision_model.embeddings.position_embedding": (1, (448 // 14) ** 2 + 1, d),
    }
    for i in range(c.vision_layers):
        p = f"vision_model.encoder.layers.{i}."
        shapes[p + "attn.qkv.weight"] = (3 * d, d)
        if not big:
            shapes[p + "attn.qkv.bias"] = (3 * d,)
        shapes[p + "attn.proj.weight"] = (d, d)
        shapes[p + "attn.proj.bias"] = (d,)
        if big:
            shapes[p + "attn.q_norm.weight"] = (d,)
            shapes[p + "attn.k_norm.weight"] = (d,)
        shapes[p + "ls1"] = (d,)
        shapes[p + "ls2"] = (d,)
        for norm in ("norm1", "norm2"):
            shapes[p + norm + ".weight"] = (d,)
            if not big:
                shapes[p + norm + ".bias"] = (d,)
        shapes[p + "mlp.fc1.weight"] = (vi, d)
        shapes[p + "mlp.fc1.bias"] = (vi,)
        shapes[p + "mlp.fc2.weight"] = (d, vi)
        shapes[p + "mlp.fc2.bias"] = (d,)
    h, ti = c.text_hidden, c.text_intermediate
    shapes["mlp1.0.weight"] = shapes["mlp1.0.bias"] = (4 * d,)
    shapes["mlp1.1.weight"] = (h, 4 * d)
    shapes["mlp1.1.bias"] = (h,)
    shapes["mlp1.3.weight"] = (h, h)
    shapes["mlp1.3.bias"] = (h,)
    hd = h // c.text_heads
    q, kv = c.text_heads * hd, c.text_kv_heads * hd
    lm = "language_model.model."
    if c.backbone == "internlm2":
        shapes[lm + "tok_embeddings.weight"] = (vocab, h)
        for i in range(c.text_layers):
            p = f"{lm}layers.{i}."
            shapes[p + "attention.wqkv.weight"] = (q + 2 * kv, h)
            shapes[p + "attention.wo.weight"] = (h, q)
            shapes[p + "feed_forward.w1.weight"] = (ti, h)
            shapes[p + "feed_forward.w3.weight"] = (ti, h)
            shapes[p + "feed_forward.w2.weight"] = (h, ti)
            shapes[p + "attention_norm.weight"] = (h,)
            shapes[p + "ffn_norm.weight"] = (h,)
        shapes[lm + "norm.weight"] = (h,)
        shapes["language_model.output.weight"] = (vocab, h)
        return shapes
    if c.backbone in INTERNVL3_5_BACKBONES:
        shapes.update(_internvl3_5_shapes(c, vocab))
        return shapes
    shapes[lm + "embed_tokens.weight"] = (vocab, h)
    for i in range(c.text_layers):
        p = f"{lm}layers.{i}."
        if c.backbone == "phi3":
            shapes[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * ti, h)
        else:
            shapes[p + "self_attn.q_proj.weight"] = (q, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            if c.backbone == "qwen2":
                shapes[p + "self_attn.q_proj.bias"] = (q,)
                shapes[p + "self_attn.k_proj.bias"] = (kv,)
                shapes[p + "self_attn.v_proj.bias"] = (kv,)
            shapes[p + "mlp.gate_proj.weight"] = (ti, h)
            shapes[p + "mlp.up_proj.weight"] = (ti, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "mlp.down_proj.weight"] = (h, ti)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes[lm + "norm.weight"] = (h,)
    shapes["language_model.lm_head.weight"] = (vocab, h)
    return shapes


def _internvl3_5_shapes(c: TinyOriginalConfig, vocab: int) -> dict[str, tuple[int, ...]]:
    """The language model of a Qwen3, Qwen3-MoE or GPT-OSS checkpoint, named
    as Transformers 4.55 saves them: Qwen3-MoE keeps one Linear per expert
    (`mlp.experts.N.gate_proj`, ...) and a router `mlp.gate`; GPT-OSS keeps
    its experts stacked (`mlp.experts.gate_up_proj` of shape (experts,
    hidden, 2 * width), gate and up interleaved column by column; `down_proj`
    of (experts, width, hidden); each with a bias), a router with a bias, and
    a learned attention sink per head (`self_attn.sinks`)."""
    h, ti = c.text_hidden, c.text_intermediate
    hd = h // c.text_heads
    q, kv = c.text_heads * hd, c.text_kv_heads * hd
    width, experts = ti // MOE_WIDTH_DIVISOR, MOE_EXPERTS
    lm = "language_model.model."
    shapes: dict[str, tuple[int, ...]] = {lm + "embed_tokens.weight": (vocab, h)}
    for i in range(c.text_layers):
        p = f"{lm}layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if c.backbone == "gpt_oss":
            for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
                shapes[p + f"self_attn.{name}.bias"] = (size,)
            shapes[p + "self_attn.sinks"] = (c.text_heads,)
            shapes[p + "mlp.router.weight"] = (experts, h)
            shapes[p + "mlp.router.bias"] = (experts,)
            shapes[p + "mlp.experts.gate_up_proj"] = (experts, h, 2 * width)
            shapes[p + "mlp.experts.gate_up_proj_bias"] = (experts, 2 * width)
            shapes[p + "mlp.experts.down_proj"] = (experts, width, h)
            shapes[p + "mlp.experts.down_proj_bias"] = (experts, h)
        else:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        if c.backbone == "qwen3":
            shapes[p + "mlp.gate_proj.weight"] = (ti, h)
            shapes[p + "mlp.up_proj.weight"] = (ti, h)
            shapes[p + "mlp.down_proj.weight"] = (h, ti)
        if c.backbone == "qwen3_moe":
            shapes[p + "mlp.gate.weight"] = (experts, h)
            for e in range(experts):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (width, h)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (width, h)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (h, width)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes[lm + "norm.weight"] = (h,)
    if c.backbone != "qwen3":  # the Qwen3 checkpoint ties its head to the embeddings
        shapes["language_model.lm_head.weight"] = (vocab, h)
    return shapes


def _value(name: str, shape: tuple[int, ...], gen: Any) -> Any:
    import torch

    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith(("ls1", "ls2")):
        return 0.5 + 0.1 * noise
    if name == "mlp1.0.weight" or ("norm" in name and leaf == "weight"):
        return 1.0 + 0.1 * noise
    if leaf == "bias":
        return 0.1 * noise
    if name.endswith(("tok_embeddings.weight", "embed_tokens.weight")):
        return noise
    if name.endswith(("class_embedding", "position_embedding")):
        return 0.5 * noise
    # GPT-OSS's stacked experts (input features on dim 1), their biases, and its attention sinks.
    if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return noise / shape[1] ** 0.5
    if name.endswith("_proj_bias"):
        return 0.1 * noise
    if name.endswith(".sinks"):
        return noise
    fan_in = 1
    for n in shape[1:]:
        fan_in *= n
    return noise / fan_in**0.5


def generate_tiny_original(
    directory: str | os.PathLike[str], config: TinyOriginalConfig = TinyOriginalConfig()
) -> Path:
    """Write a tiny original-layout checkpoint to `directory`."""
    import torch
    from safetensors.torch import save_file

    from internvl_launch.checkpoint.tiny import TinyConfig, train_tokenizer

    if config.backbone not in _LLM_ARCH:
        raise ValueError(f"unknown backbone {config.backbone!r}; choose one of {', '.join(_LLM_ARCH)}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(TinyConfig(template=config.template, vocab_target=config.vocab_target))
    tokenizer.chat_template = None
    vocab = max(len(tokenizer), config.model_vocab or 0)
    eos = tokenizer.eos_token_id
    cfg = original_config(config, vocab, eos, tokenizer.pad_token_id)
    cfg["torch_dtype"] = cfg["llm_config"]["torch_dtype"] = config.dtype
    dtype = getattr(torch, config.dtype)
    gen = torch.Generator().manual_seed(config.seed)
    tensors = {name: _value(name, shape, gen) for name, shape in tensor_shapes(config, vocab).items()}
    if config.backbone == "qwen3":
        # Its head is the embedding: scaled like the other heads, so the logits stay of order one.
        key = "language_model.model.embed_tokens.weight"
        tensors[key] = tensors[key] / config.text_hidden**0.5
    tensors = {name: value.to(dtype) for name, value in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    tok_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # readable by older Transformers too
    tok_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}) + "\n")
    (out / "internvl_launch_original.json").write_text(
        json.dumps({"generator": ORIGINAL_GENERATOR_VERSION, "config": asdict(config)}, indent=2, sort_keys=True) + "\n"
    )
    return out


def fidelity_inputs(image_token_id: int, img_start_id: int, img_end_id: int, tiles: int = 2) -> tuple[Any, Any]:
    """The fixed input of the fidelity check, computed by plain arithmetic so
    any environment reproduces it exactly: `tiles` 448-pixel tiles of a smooth
    pattern in [-2, 2] and a prompt of a few text tokens around one image block."""
    import torch

    n = tiles * 3 * 448 * 448
    index = torch.arange(n, dtype=torch.float64)
    pixels = (((index * 0.37) % 1.0) * 4.0 - 2.0).to(torch.float32).reshape(tiles, 3, 448, 448)
    text_before = [120, 42, 57, 99]  # ordinary tokens: the first ids are special
    text_after = [23, 150, 77, 64, 31]
    ids = text_before + [img_start_id] + [image_token_id] * (256 * tiles) + [img_end_id] + text_after
    return torch.tensor([ids], dtype=torch.long), pixels


#: The chat markers InternLM2's sentencepiece model holds as pieces, and the
#: image tokens InternVL adds after its vocabulary.
INTERNLM2_PIECES = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")
INTERNVL_ADDED = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")


def train_internlm2_tokenizer(out: Path, *, add_dummy_prefix: bool, vocab_size: int = 400) -> Path:
    """An InternLM2-style tokenizer directory: a sentencepiece BPE model with
    byte fallback (`<unk>`, `<s>`, `</s>` first; the chat markers as pieces),
    InternVL's image tokens added after it, and the tokenizer config that
    names InternLM2's remote tokenizer class, as published checkpoints do.
    Needs the `sentencepiece` package. Training runs on one thread, which
    makes the model file byte-for-byte reproducible for a given version."""
    import io

    import sentencepiece as spm

    from internvl_launch.checkpoint.tiny import _CORPUS

    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=add_dummy_prefix,
        user_defined_symbols=list(INTERNLM2_PIECES),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    size = processor.get_piece_size()
    decoder: dict[str, Any] = {}
    for piece in INTERNLM2_PIECES:
        decoder[str(processor.piece_to_id(piece))] = _added(piece)
    added = {piece: size + i for i, piece in enumerate(INTERNVL_ADDED)}
    for piece, index in added.items():
        decoder[str(index)] = _added(piece)
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "added_tokens_decoder": decoder,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def _added(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
        "special": True,
    }
