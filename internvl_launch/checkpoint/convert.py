"""Original-layout InternVL checkpoints to the Transformers-native layout.

OpenGVLab publishes most InternVL models as `InternVLChatModel` checkpoints
that need their own Python code. Transformers 5 cannot run that code, but its
native `InternVLForConditionalGeneration` computes the same function for
`ps_version: v2` checkpoints once the weights are renamed and a few packed
matrices are split (`ps_version: v1` checkpoints are marked in config.json and
need `internvl_launch.engines.pixel_shuffle`, which restores v1's token order):

* vision tower: `vision_model.*` -> `vision_tower.*`; the fused `attn.qkv`
  becomes `q_proj`/`k_proj`/`v_proj`; `ls1/ls2` -> `lambda_1/lambda_2`,
  `norm1/norm2` -> `layernorm_before/layernorm_after`;
* projector: `mlp1.0/1/3` -> `multi_modal_projector.layer_norm/linear_1/linear_2`;
* language model: Qwen2, Llama and Phi-3 keep their names; InternLM2 becomes a
  Llama, with `attention.wqkv` split per key/value group (its rows are packed
  as `[kv_heads, q_per_kv + 2, head_dim]`). InternVL3.5's Qwen3, Qwen3-MoE
  and GPT-OSS keep their names too: their tensors are already laid out as
  Transformers 5 saves them (Qwen3-MoE one Linear per expert, which
  Transformers stacks when it loads; GPT-OSS stacked experts with gate and up
  interleaved, and attention sinks).

AWQ checkpoints (GEMM layout, `quantization_config` in `llm_config`) convert
the same way: their `qweight`/`qzeros`/`scales` follow the renames, and
InternLM2's `wqkv` triple is split along its output dimension (dim 1) in whole
packed columns; the native config carries the `quantization_config`.

No code from the checkpoint is imported or run: everything is read from
`config.json`, the weight files and the tokenizer files. Pickle weights
(`pytorch_model*.bin`) are read with `torch.load(weights_only=True)`, which
rebuilds tensors and plain containers only; a file that needs anything else is
refused unless the caller allows full unpickling. The output is always
safetensors. Output is written to a temporary directory beside the destination
and renamed into place, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from internvl_launch.checkpoint.awq import PACK, TRIPLE, dequantize_state_dict, is_awq_config, select_output_blocks
from internvl_launch.checkpoint.local import (
    CONVERSION_MARKER,
    ORIGINAL_ARCHS,
    pickle_weight_files,
    safetensors_header,
)
from internvl_launch.engines.pixel_shuffle import CONFIG_KEY as PIXEL_SHUFFLE_KEY
from internvl_launch.engines.pixel_shuffle import apply_pixel_shuffle
from internvl_launch.errors import CheckpointError

#: Bump when converted output changes: it moves the cache key.
#: 2: AWQ checkpoints carry a top-level quantization_config (none in text_config).
CONVERTER_VERSION = 2

#: The original config's LLM class -> our name for the backbone.
BACKBONES = ORIGINAL_ARCHS
#: The native text model each backbone becomes.
NATIVE_TEXT = {
    "qwen2": "qwen2",
    "llama": "llama",
    "internlm2": "llama",
    "phi3": "phi3",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "gpt_oss": "gpt_oss",
}
#: The Transformers class of each native text model.
_TEXT_ARCH = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}

#: What InternVLChatConfig assumes when a key is absent (the original class's defaults).
_ORIGINAL_DEFAULTS = {"ps_version": "v1", "select_layer": -1, "downsample_ratio": 0.5, "max_dynamic_patch": 6}
_VIT_DEFAULTS = {
    "qkv_bias": False,
    "qk_normalization": True,
    "norm_type": "rms_norm",
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "patch_size": 14,
    "num_channels": 3,
}
MARKER = CONVERSION_MARKER
_SHARD_BYTES = 4 * 1024**3
_NOTE = Callable[[str], None]


@dataclass(frozen=True)
class OriginalCheckpoint:
    """What an original-layout checkpoint directory holds, read from its files alone."""

    path: Path
    config: dict[str, Any]
    backbone: str
    template: str | None
    ps_version: str
    image_size: int
    weight_files: tuple[str, ...]
    weight_format: str  # safetensors | pickle
    #: Read pickles with the full unpickler when the restricted one refuses them.
    allow_pickle: bool = False
    #: The AWQ `quantization_config` (from the top level or `llm_config`), if any.
    awq: dict[str, Any] | None = None

    @property
    def llm(self) -> dict[str, Any]:
        return dict(self.config["llm_config"])

    @property
    def awq_group_size(self) -> int:
        return int((self.awq or {}).get("group_size", 128))

    @property
    def vision(self) -> dict[str, Any]:
        return {**_VIT_DEFAULTS, **self.config.get("vision_config", {})}


@dataclass
class ConversionReport:
    """What a conversion did: for `--json` and for the cache marker."""

    source: str
    destination: str
    backbone: str
    native_text_model: str
    template: str | None
    system_message: str
    parameters: int
    dtype: str
    files: list[str]
    mapped: dict[str, int]
    seconds: float
    verified: bool = False
    converter_version: int = CONVERTER_VERSION
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{path} has no config.json, so it is not a checkpoint directory.",
            hint="Point at the directory that holds config.json and the weights.",
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file} is not readable JSON: {err}.") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} holds {type(config).__name__}, not a JSON object.")
    return config


def weight_files(path: Path, *, allow_pickle: bool = False) -> tuple[tuple[str, ...], str]:
    """The checkpoint's weight files and their format: the safetensors files,
    else the pickle weights (`pytorch_model*.bin`, or the shards their index
    names). Pickles are listed whether or not `allow_pickle`: what decides is
    how they are read (`_read_tensors`)."""
    del allow_pickle  # reading, not listing, depends on it
    safetensors = sorted(p.name for p in path.glob("*.safetensors"))
    if safetensors:
        return tuple(safetensors), "safetensors"
    pickles = pickle_weight_files(path)
    if pickles:
        return pickles, "pickle"
    raise CheckpointError(
        f"{path} has a config.json but no weights (*.safetensors or pytorch_model*.bin).",
        hint="Copy the weight files next to config.json, or download the checkpoint again.",
    )


def inspect_original(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> OriginalCheckpoint:
    """Check that `path` is an original-layout checkpoint this converter handles."""
    root = Path(path)
    config = read_config(root)
    archs = config.get("architectures") or []
    if "InternVLChatModel" not in archs and "llm_config" not in config:
        raise CheckpointError(
            f"{root} is not an original-layout InternVL checkpoint: its config names "
            f"{archs or 'no architecture'} and has no llm_config.",
            hint="Expected architectures ['InternVLChatModel'] with vision_config and llm_config.",
        )
    llm = config.get("llm_config")
    if not isinstance(llm, dict) or not isinstance(config.get("vision_config"), dict):
        raise CheckpointError(f"{root}/config.json lacks vision_config or llm_config.")
    llm_arch = (llm.get("architectures") or [""])[0]
    if llm_arch not in BACKBONES:
        raise CheckpointError(
            f"{root} has a {llm_arch or 'unnamed'} language model; conversion covers {', '.join(sorted(BACKBONES))}.",
        )
    ps_version = config.get("ps_version", _ORIGINAL_DEFAULTS["ps_version"])
    if ps_version not in ("v1", "v2"):
        raise CheckpointError(
            f"{root} uses pixel shuffle {ps_version!r} (config.json 'ps_version'); the original code "
            "knows 'v1' and 'v2'.",
        )
    if config.get("downsample_ratio", 0.5) != 0.5:
        raise CheckpointError(f"{root} has downsample_ratio {config['downsample_ratio']}; only 0.5 is supported.")
    vision = config["vision_config"]
    image_size = int(config.get("force_image_size") or vision.get("image_size") or 448)
    awq = _awq_config(root, config)
    files, fmt = weight_files(root, allow_pickle=allow_pickle)
    return OriginalCheckpoint(
        path=root,
        config=config,
        backbone=BACKBONES[llm_arch],
        template=config.get("template"),
        ps_version=ps_version,
        image_size=image_size,
        weight_files=files,
        weight_format=fmt,
        allow_pickle=allow_pickle,
        awq=awq,
    )


def _awq_config(root: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's AWQ settings, or None for a float checkpoint. Other
    quantization methods, and AWQ variants whose tensors are laid out
    differently (GEMV, no zero point, other than 4 bits), are refused."""
    quant = config.get("quantization_config") or config["llm_config"].get("quantization_config")
    if not quant:
        return None
    if not is_awq_config(quant):
        method = quant.get("quant_method", "unnamed") if isinstance(quant, dict) else type(quant).__name__
        raise CheckpointError(
            f"{root} is quantized with {method}; the converter handles float and AWQ checkpoints only.",
            hint="Convert the float checkpoint and quantize at load time (--quantization 8-bit or 4-bit).",
        )
    version = str(quant.get("version", "gemm")).lower()
    bits = int(quant.get("bits", quant.get("w_bit", 4)))
    zero_point = bool(quant.get("zero_point", True))
    group = int(quant.get("group_size", quant.get("q_group_size", 128)))
    if version != "gemm" or bits != 4 or not zero_point or group <= 0:
        raise CheckpointError(
            f"{root} is AWQ with version {version!r}, {bits} bits, zero_point {zero_point}, group_size {group}; "
            "the converter reads the GEMM layout with 4 bits, zero points and a positive group size.",
        )
    return {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": zero_point, "version": "gemm"}


# --- configuration ---------------------------------------------------------------------

_LLM_DROP = {
    "architectures",
    "auto_map",
    "attn_implementation",
    "_name_or_path",
    "transformers_version",
    "model_type",
    "quantization_config",
}
#: The native modules an AWQ conversion leaves in float. Each is named twice:
#: bare, for loaders that match a name anywhere in a module path (vLLM), and
#: with `model.`, for Transformers, which matches from the start of the path
#: (its InternVL class holds them as `model.vision_tower` and
#: `model.multi_modal_projector`; `lm_head` sits at the top).
AWQ_NOT_CONVERTED = (
    "vision_tower",
    "multi_modal_projector",
    "lm_head",
    "model.vision_tower",
    "model.multi_modal_projector",
)


def native_text_config(src: OriginalCheckpoint, *, has_lm_head: bool) -> dict[str, Any]:
    """The native text config as a dict for the backbone's Transformers class."""
    llm = src.llm
    if src.backbone == "internlm2":
        text: dict[str, Any] = {
            "vocab_size": llm["vocab_size"],
            "hidden_size": llm["hidden_size"],
            "intermediate_size": llm["intermediate_size"],
            "num_hidden_layers": llm["num_hidden_layers"],
            "num_attention_heads": llm["num_attention_heads"],
            "num_key_value_heads": llm.get("num_key_value_heads") or llm["num_attention_heads"],
            "hidden_act": llm.get("hidden_act", "silu"),
            "max_position_embeddings": llm.get("max_position_embeddings", 2048),
            "rms_norm_eps": llm.get("rms_norm_eps", 1e-6),
            "rope_theta": llm.get("rope_theta", 10000),
            "rope_scaling": llm.get("rope_scaling"),
            "attention_bias": bool(llm.get("bias", False)),
            "mlp_bias": False,
            "bos_token_id": llm.get("bos_token_id"),
            "eos_token_id": llm.get("eos_token_id"),
            "pad_token_id": llm.get("pad_token_id"),
        }
    else:
        text = {k: v for k, v in llm.items() if k not in _LLM_DROP}
        if "torch_dtype" in text:
            text["dtype"] = text.pop("torch_dtype")
    text["model_type"] = NATIVE_TEXT[src.backbone]
    text["architectures"] = [_TEXT_ARCH[NATIVE_TEXT[src.backbone]]]
    # InternVLChatConfig forces untied embeddings (InternVL3.5's follows
    # llm_config, whose Transformers save leaves out a tied head); a
    # checkpoint without a head ties them.
    text["tie_word_embeddings"] = not has_lm_head
    return text


def native_vision_config(src: OriginalCheckpoint) -> dict[str, Any]:
    vit = src.vision
    patch = int(vit["patch_size"])
    return {
        "model_type": "internvl_vision",
        "hidden_size": vit["hidden_size"],
        "num_hidden_layers": vit["num_hidden_layers"],
        "num_attention_heads": vit["num_attention_heads"],
        "intermediate_size": vit["intermediate_size"],
        "hidden_act": vit["hidden_act"],
        "layer_norm_eps": vit["layer_norm_eps"],
        "norm_type": vit["norm_type"],
        "use_qk_norm": bool(vit["qk_normalization"]),
        "attention_bias": bool(vit["qkv_bias"]),
        "image_size": [src.image_size, src.image_size],
        "patch_size": [patch, patch],
        "num_channels": vit["num_channels"],
        # The original tower has no final norm: the native Identity is `use_mean_pooling`.
        "use_mean_pooling": True,
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
        "attention_dropout": 0.0,
        "projection_dropout": 0.0,
        "hidden_dropout_prob": 0.0,
        "layer_scale_init_value": 0.1,
    }


def native_config(src: OriginalCheckpoint, *, image_token_id: int, has_lm_head: bool, dtype: str) -> dict[str, Any]:
    """The native `InternVLConfig` as a dict (written to config.json)."""
    vit = src.vision
    tokens_per_tile = int(
        (src.image_size // int(vit["patch_size"])) ** 2 * src.config.get("downsample_ratio", 0.5) ** 2
    )
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": native_vision_config(src),
        "text_config": native_text_config(src, has_lm_head=has_lm_head),
        "image_token_id": image_token_id,
        "image_seq_length": tokens_per_tile,
        "downsample_ratio": src.config.get("downsample_ratio", 0.5),
        "projector_hidden_act": "gelu",
        "vision_feature_layer": src.config.get("select_layer", -1),
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": not has_lm_head,
        "dtype": dtype,
        **({"quantization_config": native_quantization_config(src)} if src.awq else {}),
        **({PIXEL_SHUFFLE_KEY: "v1"} if src.ps_version == "v1" else {}),
    }


def native_quantization_config(src: OriginalCheckpoint) -> dict[str, Any]:
    """The top-level `quantization_config` of an AWQ conversion."""
    return {**(src.awq or {}), "modules_to_not_convert": list(AWQ_NOT_CONVERTED)}


# --- weights ---------------------------------------------------------------------------

_VISION_RULES = [
    (r"vision_model\.embeddings\.class_embedding", "vision_tower.embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "vision_tower.embeddings.position_embeddings"),
    (r"vision_model\.embeddings\.patch_embedding\.", "vision_tower.embeddings.patch_embeddings.projection."),
    (
        r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.",
        r"vision_tower.encoder.layer.\1.attention.projection_layer.",
    ),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.", r"vision_tower.encoder.layer.\1.attention.\2."),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls1$", r"vision_tower.encoder.layer.\1.lambda_1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls2$", r"vision_tower.encoder.layer.\1.lambda_2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"vision_tower.encoder.layer.\1.layernorm_before."),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"vision_tower.encoder.layer.\1.layernorm_after."),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"vision_tower.encoder.layer.\1.mlp."),
    (r"mlp1\.0\.", "multi_modal_projector.layer_norm."),
    (r"mlp1\.1\.", "multi_modal_projector.linear_1."),
    (r"mlp1\.3\.", "multi_modal_projector.linear_2."),
]
_INTERNLM2_RULES = [
    (r"language_model\.model\.tok_embeddings\.", "language_model.model.embed_tokens."),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wo\.", r"language_model.model.layers.\1.self_attn.o_proj."),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w1\.", r"language_model.model.layers.\1.mlp.gate_proj."),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w3\.", r"language_model.model.layers.\1.mlp.up_proj."),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w2\.", r"language_model.model.layers.\1.mlp.down_proj."),
    (r"language_model\.model\.layers\.(\d+)\.attention_norm\.", r"language_model.model.layers.\1.input_layernorm."),
    (r"language_model\.model\.layers\.(\d+)\.ffn_norm\.", r"language_model.model.layers.\1.post_attention_layernorm."),
    (r"language_model\.model\.norm\.", "language_model.model.norm."),
    (r"language_model\.output\.", "language_model.lm_head."),
]
# Qwen2, Llama, Phi-3, Qwen3, Qwen3-MoE and GPT-OSS keep their Transformers names under `language_model.`.
_PLAIN_LLM_RULES = [(r"language_model\.(model\.|lm_head\.)", r"language_model.\1")]
_VIT_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
_WQKV = re.compile(r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias|qweight|qzeros|scales)$")
#: Training-only tensors some checkpoints carry; they have no native counterpart.
_IGNORED = re.compile(r"(\.inv_freq$|\.rotary_emb\.|^vision_model\.clip_projector|^vision_model\.head)")


def _group(new_key: str) -> str:
    return new_key.split(".", 1)[0]


class WeightMapper:
    """Maps one original tensor to its native tensors, counting what it mapped."""

    def __init__(self, src: OriginalCheckpoint) -> None:
        self.backbone = src.backbone
        vit = src.vision
        self.vit_hidden = int(vit["hidden_size"])
        llm = src.llm
        self.heads = int(llm["num_attention_heads"])
        self.kv_heads = int(llm.get("num_key_value_heads") or self.heads)
        self.head_dim = int(llm.get("head_dim") or int(llm["hidden_size"]) // self.heads)
        llm_rules = _INTERNLM2_RULES if self.backbone == "internlm2" else _PLAIN_LLM_RULES
        self.rules = [(re.compile(p), r) for p, r in _VISION_RULES + llm_rules]
        self.mapped: dict[str, int] = {}
        self.ignored: list[str] = []

    def _count(self, what: str, n: int = 1) -> None:
        self.mapped[what] = self.mapped.get(what, 0) + n

    def map(self, key: str, tensor: Any) -> Iterator[tuple[str, Any]]:
        if _IGNORED.search(key):
            self.ignored.append(key)
            return
        m = _VIT_QKV.match(key)
        if m:
            layer, kind = m.groups()
            q, k, v = tensor.chunk(3, dim=0)
            self._count("vision qkv split")
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                yield f"vision_tower.encoder.layer.{layer}.attention.{name}.{kind}", part.contiguous()
            return
        m = _WQKV.match(key) if self.backbone == "internlm2" else None
        if m:
            layer, kind = m.groups()
            self._count("internlm2 wqkv split")
            parts = self.split_wqkv(tensor) if kind in ("weight", "bias") else self.split_wqkv_awq(tensor, kind)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=False):
                yield f"language_model.model.layers.{layer}.self_attn.{name}.{kind}", part
            return
        for pattern, replacement in self.rules:
            if pattern.match(key):
                new = pattern.sub(replacement, key, count=1)
                self._count(f"{_group(new)} renamed")
                yield new, tensor
                return
        raise CheckpointError(
            f"Weight {key!r} has no counterpart in the native layout ({self.backbone} backbone).",
            hint="The checkpoint may come from a newer InternVL variant; nothing was written.",
        )

    def split_wqkv(self, tensor: Any) -> tuple[Any, Any, Any]:
        """InternLM2 packs, for each key/value head, its `q_per_kv` query heads,
        then the key head, then the value head. Llama wants all query heads (head
        i reads key/value head i // q_per_kv), then all key heads, then all value heads."""
        q_per_kv = self.heads // self.kv_heads
        rest = tensor.shape[1:]
        grouped = tensor.reshape(self.kv_heads, q_per_kv + 2, self.head_dim, *rest)
        q = grouped[:, :q_per_kv].reshape(self.heads * self.head_dim, *rest)
        k = grouped[:, q_per_kv].reshape(self.kv_heads * self.head_dim, *rest)
        v = grouped[:, q_per_kv + 1].reshape(self.kv_heads * self.head_dim, *rest)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def wqkv_blocks(self) -> tuple[list[int], list[int], list[int]]:
        """The head-sized output blocks of InternLM2's `wqkv` that make up the
        query, key and value projections, in Llama's order: block
        `g * (q_per_kv + 2) + j` is query head `j` of key/value group `g` for
        `j < q_per_kv`, then that group's key, then its value."""
        q_per_kv = self.heads // self.kv_heads
        per = q_per_kv + 2
        q = [g * per + j for g in range(self.kv_heads) for j in range(q_per_kv)]
        k = [g * per + q_per_kv for g in range(self.kv_heads)]
        v = [g * per + q_per_kv + 1 for g in range(self.kv_heads)]
        return q, k, v

    def split_wqkv_awq(self, tensor: Any, kind: str) -> tuple[Any, Any, Any]:
        """`split_wqkv` for one AWQ tensor of `wqkv`: its output dimension is
        dim 1, counted in packed columns of 8 channels for `qweight`/`qzeros`
        and in channels for `scales`, so whole heads move as whole columns."""
        packed = kind != "scales"
        if packed and self.head_dim % PACK:
            raise CheckpointError(
                f"InternLM2's wqkv.{kind} cannot be split: head_dim {self.head_dim} is not a multiple of {PACK}, "
                f"so a head does not fill whole packed AWQ columns.",
                hint="Convert the float checkpoint instead; nothing was written.",
            )
        channels = (self.heads + 2 * self.kv_heads) * self.head_dim
        width = channels // PACK if packed else channels
        if tensor.dim() != 2 or tensor.shape[1] != width:
            raise CheckpointError(
                f"InternLM2's wqkv.{kind} has shape {tuple(tensor.shape)}; {self.heads} query and "
                f"{self.kv_heads} key/value heads of {self.head_dim} need {width} columns.",
                hint="The config does not describe these weights; nothing was written.",
            )
        return tuple(  # type: ignore[return-value]
            select_output_blocks(tensor, self.head_dim, blocks, packed=packed) for blocks in self.wqkv_blocks()
        )


def _read_tensors(src: OriginalCheckpoint) -> Iterator[tuple[str, Any]]:
    """Every tensor of the checkpoint, one file at a time."""
    for name in src.weight_files:
        file = src.path / name
        if src.weight_format == "safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():
                        yield key, handle.get_tensor(key)
            except (SafetensorError, OSError) as err:
                raise CheckpointError(
                    f"{file} cannot be read as safetensors ({err}); it may be truncated or corrupt.",
                    hint="Download or copy the file again; nothing was written.",
                ) from err
        else:
            yield from _read_pickle(file, allow_pickle=src.allow_pickle).items()


def _read_pickle(file: Path, *, allow_pickle: bool) -> dict[str, Any]:
    """A `torch.save`d state dict, read with the restricted loader
    (`weights_only=True`: tensors and plain containers, nothing else is
    built or called; memory-mapped when the file is in the zip format). A file
    that loader refuses raises `CheckpointError`, unless `allow_pickle`, which
    reads it with the full unpickler."""
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except (pickle.UnpicklingError, RuntimeError) as err:
        restricted = isinstance(err, pickle.UnpicklingError) or "weights only load failed" in str(err).lower()
        if not restricted:
            raise CheckpointError(
                f"{file} cannot be read as PyTorch weights ({_first_line(err)}); it may be truncated or corrupt.",
                hint="Download or copy the file again; nothing was written.",
            ) from err
        if not allow_pickle:
            reason = _restricted_reason(err)
            what = (
                "holds objects other than tensors"
                if "unsupported global" in reason.lower()
                else "uses pickle features beyond tensors, or is corrupt"
            )
            raise CheckpointError(
                f"{file} {what} ({reason}), which the safe loader (torch.load with weights_only=True) "
                "refuses: unpickling it could run code.",
                hint="Use safetensors weights, or pass --allow-pickle if you trust where this file came from.",
            ) from err
        try:
            state = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as full_err:
            raise CheckpointError(f"{file} cannot be read as PyTorch weights ({_first_line(full_err)}).") from full_err
    except Exception as err:
        raise CheckpointError(
            f"{file} cannot be read as PyTorch weights ({_first_line(err)}); it may be truncated or corrupt.",
            hint="Download or copy the file again; nothing was written.",
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{file} holds {type(state).__name__}"
            + (" with entries other than tensors" if isinstance(state, dict) else "")
            + ", not a state dict of tensors.",
            hint="Point at a checkpoint whose pytorch_model*.bin files hold state dicts.",
        )
    return state


def _restricted_reason(err: BaseException) -> str:
    """What the restricted loader objected to, without its boilerplate."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
        text = text.split("\n\n", 1)[0].split(" was not an allowed global", 1)[0].strip()
    return _first_line(Exception(text))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


_HEADS = ("language_model.lm_head.", "language_model.output.")


def _has_lm_head(src: OriginalCheckpoint) -> bool | None:
    """Whether the checkpoint has its own output head, read from the
    safetensors headers (which also catches a truncated file before anything
    is written) or a pickle index; None when only reading the weights tells."""
    keys: set[str] = set()
    if src.weight_format == "safetensors":
        for name in src.weight_files:
            keys.update(safetensors_header(src.path / name))
    elif (src.path / "pytorch_model.bin.index.json").is_file():
        index = json.loads((src.path / "pytorch_model.bin.index.json").read_text())
        keys.update(index.get("weight_map") or {})
    else:
        return None
    return any(k.startswith(_HEADS) for k in keys)


def _write_weights(
    src: OriginalCheckpoint, out: Path, mapper: WeightMapper, dtype: Any | None
) -> tuple[list[str], int, str, set[str]]:
    """Stream the mapped tensors into shards of at most `_SHARD_BYTES`, each
    written as soon as it is full, so memory holds one shard at a time, not
    the model. Returns the files written, the parameter count (an AWQ
    `qweight` counts 8 per int32, its `qzeros`/`scales` none), the dtype
    and the native names written. `dtype` casts floating tensors only
    (never the int32 `qweight`/`qzeros`)."""
    from safetensors.torch import save_file

    shard: dict[str, Any] = {}
    size = 0
    written: list[tuple[Path, list[str], int]] = []  # temporary file, its keys, its bytes
    seen: set[str] = set()
    params = 0
    dtypes: set[str] = set()

    def flush() -> None:
        nonlocal shard, size
        if shard:
            path = out / f".shard-{len(written) + 1:05d}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            written.append((path, list(shard), size))
        shard, size = {}, 0

    for key, tensor in _read_tensors(src):
        for new_key, new in mapper.map(key, tensor):
            if dtype is not None and new.is_floating_point():
                new = new.to(dtype)
            nbytes = new.numel() * new.element_size()
            if size and size + nbytes > _SHARD_BYTES:
                flush()
            if new_key in seen:
                raise CheckpointError(f"Two weights of {src.path} map to {new_key}.")
            seen.add(new_key)
            shard[new_key] = new
            size += nbytes
            leaf = new_key.rsplit(".", 1)[-1]
            if src.awq and leaf in TRIPLE:
                params += new.numel() * PACK if leaf == "qweight" else 0
            else:
                params += new.numel()
            dtypes.add(str(new.dtype).removeprefix("torch."))
    flush()
    files: list[str] = []
    if len(written) == 1:
        written[0][0].rename(out / "model.safetensors")
        files.append("model.safetensors")
    else:
        weight_map: dict[str, str] = {}
        for i, (path, keys, _bytes) in enumerate(written, 1):
            name = f"model-{i:05d}-of-{len(written):05d}.safetensors"
            path.rename(out / name)
            weight_map.update(dict.fromkeys(keys, name))
            files.append(name)
        total = sum(b for _, _, b in written)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        files.append("model.safetensors.index.json")
    dominant = "bfloat16" if "bfloat16" in dtypes else ("float16" if "float16" in dtypes else "float32")
    return files, params, dominant, seen


# --- tokenizer and generation config ---------------------------------------------------

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def _write_tokenizer(src: OriginalCheckpoint, out: Path, template: Any, system_message: str) -> tuple[Any, list[str]]:
    """Copy the tokenizer without its remote code, add what native processors
    read (named image tokens, a chat template that emits `<IMG_CONTEXT>`), and
    return it loaded from `out`, with notes. Sentencepiece-only tokenizers
    (InternLM2) are turned into a `tokenizer.json` first."""
    from internvl_launch.checkpoint.tiny import NAMED_IMAGE_TOKENS, chat_template
    from internvl_launch.prompt.templates import IMG_CONTEXT

    notes: list[str] = []
    for name in _TOKENIZER_FILES:
        if (src.path / name).is_file():
            shutil.copy2(src.path / name, out / name)
    if not (out / "tokenizer.json").is_file():
        if (out / "vocab.json").is_file() and (out / "merges.txt").is_file():
            _bpe_files_to_fast(out, notes)
        else:
            _sentencepiece_to_fast(out, notes)
    config_path = out / "tokenizer_config.json"
    tok_cfg: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if tok_cfg.pop("auto_map", None) is not None:
        notes.append("tokenizer: dropped auto_map (remote tokenizer code)")
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.update(NAMED_IMAGE_TOKENS)
    tok_cfg["chat_template"] = chat_template(template.name, system_message)
    config_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    missing = [t for t in ("<img>", "</img>", IMG_CONTEXT) if t not in tokenizer.get_vocab()]
    if missing:
        raise CheckpointError(
            f"The tokenizer of {src.path} lacks {', '.join(missing)}; InternVL needs them as tokens.",
            hint="Is this a language-model-only checkpoint? Nothing was written.",
        )
    return tokenizer, notes


def _bpe_files_to_fast(out: Path, notes: list[str]) -> None:
    """Build `tokenizer.json` from `vocab.json` and `merges.txt` (Qwen2's
    repositories may ship only these, with `tokenizer_class: Qwen2Tokenizer`):
    Transformers' own Qwen2 tokenizer reads them, added tokens included."""
    from transformers import Qwen2TokenizerFast

    try:
        tokenizer = Qwen2TokenizerFast.from_pretrained(out)
    except Exception as err:
        raise CheckpointError(
            f"The tokenizer files vocab.json and merges.txt could not be read as a Qwen2 tokenizer ({err}).",
            hint="Copy the checkpoint's tokenizer files again; nothing was written.",
        ) from err
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    notes.append("tokenizer: tokenizer.json built from vocab.json and merges.txt")


def _sentencepiece_to_fast(out: Path, notes: list[str]) -> None:
    """Build `tokenizer.json` from `tokenizer.model` (InternLM2 ships only the
    sentencepiece model plus remote tokenizer code)."""
    if not (out / "tokenizer.model").is_file():
        raise CheckpointError(
            "The checkpoint has neither tokenizer.json nor tokenizer.model.",
            hint="Copy the tokenizer files next to config.json.",
        )
    from internvl_launch.checkpoint.sentencepiece import build_tokenizer_json

    build_tokenizer_json(out)
    notes.append("tokenizer: tokenizer.json built from tokenizer.model")


def _write_generation_config(src: OriginalCheckpoint, out: Path, template: Any, tokenizer: Any) -> int | None:
    """Generation config whose end token is the template's (`<|im_end|>`, or
    `<|end|>` for phi3-chat), as the original `chat()` sets it."""
    stop_id = tokenizer.convert_tokens_to_ids(template.stop_token)
    if stop_id is None or stop_id == tokenizer.unk_token_id:
        stop_id = None
    llm = src.llm
    eos = [stop_id] if stop_id is not None else []
    base = llm.get("eos_token_id")
    for extra in base if isinstance(base, list) else [base]:
        if isinstance(extra, int) and extra not in eos:
            eos.append(extra)
    gen = {"eos_token_id": eos[0] if len(eos) == 1 else eos, "do_sample": False}
    pad = llm.get("pad_token_id", tokenizer.pad_token_id)
    if pad is not None:
        gen["pad_token_id"] = pad
    if llm.get("bos_token_id") is not None:
        gen["bos_token_id"] = llm["bos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return stop_id


# --- the conversion --------------------------------------------------------------------


def template_for(src: OriginalCheckpoint) -> Any:
    """The checkpoint's conversation template (its config names it)."""
    from internvl_launch.prompt.templates import TEMPLATES

    name = src.template or ("phi3-chat" if src.backbone == "phi3" else "internlm2-chat")
    if name not in TEMPLATES:
        raise CheckpointError(
            f"{src.path} names template {name!r}, which is not one of {', '.join(sorted(TEMPLATES))}.",
        )
    return TEMPLATES[name]


def _dtype(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in table:
        raise CheckpointError(f"Unknown dtype {name!r}; choose one of {', '.join(table)}.")
    return table[name]


def convert(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    dtype: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    system_message: str | None = None,
    notify: _NOTE | None = None,
) -> ConversionReport:
    """Convert the original-layout checkpoint at `source` into a native one at
    `destination`. The destination must be absent or empty unless `overwrite`;
    it is written whole or not at all."""
    from internvl_launch.prompt.templates import DEFAULT_SYSTEM_MESSAGES, IMG_CONTEXT

    started = time.perf_counter()
    say = notify or (lambda _message: None)
    src = inspect_original(source, allow_pickle=allow_pickle)
    dst = Path(destination)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a directory.")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{dst} is not empty; conversion writes a whole checkpoint and does not mix files.",
            hint="Choose a new directory, or pass --overwrite to replace it.",
        )
    if dst.resolve() == src.path.resolve():
        raise CheckpointError("The destination is the source directory.", hint="Choose another directory.")
    template = template_for(src)
    message = system_message
    if message is None:
        message = src.config.get("system_message") or DEFAULT_SYSTEM_MESSAGES[template.name]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        say(f"Reading {src.path} ({src.backbone} backbone, template {template.name}, {len(src.weight_files)} file(s))")
        tokenizer, notes = _write_tokenizer(src, tmp, template, message)
        image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        has_head = _has_lm_head(src)
        mapper = WeightMapper(src)
        _files, params, dominant, written = _write_weights(src, tmp, mapper, _dtype(dtype))
        if has_head is None:
            has_head = any(k.startswith("language_model.lm_head.") for k in written)
        if src.weight_format == "pickle":
            notes.append(
                f"weights: read {len(src.weight_files)} pickle file(s) with torch.load(weights_only=True), "
                "written as safetensors"
            )
        config = native_config(src, image_token_id=image_token_id, has_lm_head=has_head, dtype=dtype or dominant)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_generation_config(src, tmp, template, tokenizer)
        from internvl_launch.checkpoint.tiny import write_processor_files

        write_processor_files(tmp, max_tiles=int(src.config.get("max_dynamic_patch", 12)))
        if mapper.ignored:
            notes.append(f"skipped {len(mapper.ignored)} training-only tensor(s), e.g. {mapper.ignored[0]}")
        if src.ps_version == "v1":
            notes.append(
                "pixel shuffle v1"
                + ("" if "ps_version" in src.config else " (ps_version absent: the original code's default)")
                + f": config.json carries {PIXEL_SHUFFLE_KEY}: v1; internvl-launch's Transformers engine "
                "restores v1's token order, other runtimes would compute v2"
            )
        report = ConversionReport(
            source=str(src.path),
            destination=str(dst),
            backbone=src.backbone,
            native_text_model=NATIVE_TEXT[src.backbone],
            template=template.name,
            system_message=message,
            parameters=params,
            dtype=dtype or dominant,
            files=[*sorted(p.name for p in tmp.iterdir() if p.is_file()), MARKER],
            mapped=dict(sorted(mapper.mapped.items())),
            seconds=0.0,
            notes=notes,
        )
        if verify:
            say("Verifying: loading the converted model and running one forward pass")
            verify_checkpoint(tmp)
            report.verified = True
            if src.awq:
                report.notes.append(
                    "verified dequantized: the AWQ weights were dequantized to float in memory and run "
                    "without AWQ kernels"
                )
        report.seconds = round(time.perf_counter() - started, 3)
        (tmp / MARKER).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        _replace(tmp, dst)
        report.destination = str(dst)
        return report
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` to `dst`, replacing an old `dst` only once the
    new one is complete."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        try:
            tmp.rename(dst)
        except OSError:
            old.rename(dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)


def load_dequantized(path: Path, *, dtype: Any = None, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """A native AWQ checkpoint as a float `InternVLForConditionalGeneration`:
    every `qweight`/`qzeros`/`scales` triple dequantized to a float weight in
    memory and the model built without its `quantization_config`, so no AWQ
    kernel is needed. `dtype` defaults to float32. Returns the model and
    Transformers' loading info (missing, unexpected, mismatched keys)."""
    import torch
    from safetensors.torch import load_file
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = json.loads((path / "config.json").read_text())
    quant = config.pop("quantization_config", None)
    if not is_awq_config(quant):
        raise CheckpointError(f"{path} is not an AWQ checkpoint (no AWQ quantization_config).")
    tensors: dict[str, Any] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    state = dequantize_state_dict(tensors, int(quant.get("group_size", 128)))
    dtype = dtype or torch.float32
    config["dtype"] = str(dtype).removeprefix("torch.")
    model, info = InternVLForConditionalGeneration.from_pretrained(
        None,
        config=InternVLConfig.from_dict(config),
        state_dict=state,
        dtype=dtype,
        device_map=device,
        output_loading_info=True,
    )
    return model.eval(), info


def verify_checkpoint(path: Path) -> None:
    """Load a native checkpoint with Transformers' classes (in its own dtype,
    on the GPU when there is one) and run one forward pass on a generated
    one-tile image; raise if anything fails or a weight is missing. An AWQ
    checkpoint is checked dequantized (`load_dequantized`: float weights in
    memory, float32 on CPU and the config's dtype on a GPU), because AWQ
    kernels need a GPU and an extra package; what is checked is the names,
    the shapes and the packing of every tensor."""
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, InternVLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from internvl_launch.prompt.templates import IMG_CONTEXT, IMG_END, IMG_START
    from internvl_launch.vision.tiling import preprocess_image

    hf_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if is_awq_config(json.loads((path / "config.json").read_text()).get("quantization_config")):
            config_dtype = json.loads((path / "config.json").read_text()).get("dtype") or "float16"
            model, info = load_dequantized(
                path, dtype=getattr(torch, config_dtype) if device == "cuda" else torch.float32, device=device
            )
        else:
            model, info = InternVLForConditionalGeneration.from_pretrained(
                path, dtype="auto", device_map=device, output_loading_info=True
            )
            model.eval()
        apply_pixel_shuffle(model)
        problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            raise CheckpointError(
                "The converted checkpoint does not match Transformers' InternVL model: "
                + "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:3]))}" for k, v in problems.items())
                + ".",
                hint="Nothing was written. This checkpoint has tensors the converter does not know.",
                details=problems,
            )
        size = model.config.vision_config.image_size[0]
        image = Image.new("RGB", (size, size), (200, 120, 40))
        pixels = preprocess_image(image, max_tiles=1, image_size=size, cache=False, dtype=model.dtype)
        tokens_per_tile = model.config.image_seq_length
        text = f"{IMG_START}{IMG_CONTEXT * tokens_per_tile * pixels.shape[0]}{IMG_END}\nDescribe the image."
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), pixel_values=pixels.to(device)).logits
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(
            f"The converted checkpoint did not load and run: {type(err).__name__}: {err}.",
            hint="Nothing was written. Run with INTERNVL_DEBUG=1 for a traceback, or --no-verify to skip the check.",
        ) from err
    if not torch.isfinite(logits.float()).all():
        raise CheckpointError("The converted checkpoint computes non-finite logits on a test image.")


# --- the cache the launcher uses -------------------------------------------------------


def source_fingerprint(path: Path) -> str:
    """A key for a local source: its resolved path and its files' names, sizes
    and modification times, so an edited checkpoint is converted again."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        stat = file.stat()
        h.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def converted_dir(source: Path, *, repo_id: str | None = None, revision: str | None = None) -> Path:
    """Where the cached conversion of `source` lives: per hub repo and revision
    when it came from a hub, per fingerprint for a local directory."""
    from internvl_launch.paths import cache_dir

    root = cache_dir() / "converted"
    if repo_id is not None:
        rev = revision or f"files-{source_fingerprint(source)}"
        return root / repo_id.replace("/", "--") / f"{rev}-v{CONVERTER_VERSION}"
    return root / "local" / f"{source.resolve().name}-{source_fingerprint(source)}-v{CONVERTER_VERSION}"


def cached_conversion(
    source: Path,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    notify: _NOTE | None = None,
) -> tuple[Path, bool]:
    """The native conversion of `source`, converting on first use. Returns the
    directory and whether it was already cached."""
    target = converted_dir(source, repo_id=repo_id, revision=revision)
    if (target / MARKER).is_file():
        return target, True
    say = notify or (lambda _message: None)
    say(f"Converting {source} to the Transformers-native layout (cached at {target})")
    convert(source, target, allow_pickle=allow_pickle, verify=False, overwrite=True, notify=notify)
    return target, False
