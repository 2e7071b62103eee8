"""What a checkpoint directory is, read from its own files.

`--model-path DIR` needs no registry entry: the layout (original
`InternVLChatModel` or native `InternVLForConditionalGeneration`), the language
model, the template, the tile limit and the size all come from `config.json`,
the tokenizer files and the weights' headers (safetensors headers, or the
pickle records of `pytorch_model*.bin`, read for names and shapes without
loading a tensor or running anything). Each value carries where it came from,
so the plan can say so. Reading is cheap (JSON and the first bytes of each
weight file): this runs in the light commands, which import no torch.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from internvl_launch.errors import CheckpointError

ORIGINAL_ARCHS = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "InternLM2ForCausalLM": "internlm2",
    "Phi3ForCausalLM": "phi3",
    # InternVL3.5
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
}
_NATIVE_TEXT = {
    "qwen2": "qwen2",
    "llama": "llama",
    "phi3": "phi3",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "gpt_oss": "gpt_oss",
}
_VISION_PREFIXES = ("vision_model.", "vision_tower.", "model.vision_tower.")
CONVERSION_MARKER = "internvl_launch_conversion.json"


@dataclass(frozen=True)
class LocalCheckpoint:
    """A checkpoint directory described from its files; `provenance` says,
    for each value, which file (or which rule) it came from."""

    path: Path
    layout: str  # original | native
    arch: str  # qwen2 | internlm2 | llama | phi3 | qwen3 | qwen3_moe | gpt_oss
    llm_name: str
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vision_name: str
    vision_params: int
    parameters: int
    template: str
    system_message: str | None
    max_tiles: int
    context_length: int
    format: str  # pytorch | awq
    weight_files: tuple[str, ...]
    provenance: dict[str, str] = field(default_factory=dict)
    pixel_shuffle: str = "v2"  # v1 (InternVL 1.5) | v2

    @property
    def size(self) -> float:
        """Billions of parameters, to two significant figures (0.94, 2.2, 8.1, 26)."""
        b = self.parameters / 1e9
        return float(f"{b:.2g}") if b > 0 else 0.001


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err.strerror}.") from err
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}).", hint=f"Restore the checkpoint's {what}.") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds {type(data).__name__}, not a JSON object.")
    return data


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size
    so that a truncated download is caught before anything loads it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, 100 * 1024 * 1024):
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt.",
            hint="Download or copy the file again.",
        ) from err
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: its header describes {8 + length + end} bytes, the file has {size}.",
            hint="Download or copy the file again.",
        )
    return header


#: The index of sharded pickle weights (`pytorch_model-0000N-of-0000M.bin`).
PICKLE_INDEX = "pytorch_model.bin.index.json"


def pickle_weight_files(path: Path) -> tuple[str, ...]:
    """The pickle weight files of a checkpoint directory: those its
    `pytorch_model.bin.index.json` names (each must exist), else every
    `pytorch_model*.bin` / `model*.bin` (never training files such as
    `training_args.bin`)."""
    index = path / PICKLE_INDEX
    if index.is_file():
        weight_map = _read_json(index, PICKLE_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map.", hint="Restore the index, or download it again.")
        files = tuple(sorted({str(v) for v in weight_map.values()}))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{index} names {', '.join(missing[:3])}, which {'is' if len(missing) == 1 else 'are'} missing.",
                hint="Copy or download the missing shards.",
            )
        return files
    return tuple(sorted(p.name for p in path.glob("*.bin") if p.name.startswith(("pytorch_model", "model"))))


class _Storage:
    """Stands for a tensor's storage while reading a pickle's records."""


class _TensorRecord:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def _rebuild_tensor(_storage: Any, _offset: Any, size: Any, *_rest: Any) -> _TensorRecord:
    return _TensorRecord(tuple(int(d) for d in size))


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


#: The only globals a state dict's pickle may name, each mapped to a record builder of ours.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _ShapeUnpickler(pickle.Unpickler):
    """Reads a PyTorch state dict's pickle for tensor names and shapes only:
    storages are never loaded and the only callables it resolves are its own
    record builders and `OrderedDict`; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_GLOBALS:
            return _PICKLE_GLOBALS[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _Storage
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a tensor state dict")

    def persistent_load(self, pid: Any) -> Any:
        return _Storage()


def pickle_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's name and shape in a `torch.save`d state dict, read from
    its pickle records alone (no torch import, no tensor data read, nothing
    run). Raises `CheckpointError` when the file is not such a state dict."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                record = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if record is None:
                    raise ValueError("a zip file without data.pkl")
                state = _ShapeUnpickler(io.BytesIO(archive.read(record))).load()
        else:
            with path.open("rb") as handle:  # the legacy format: magic, protocol, system info, then the object
                for _ in range(3):
                    _ShapeUnpickler(handle).load()
                state = _ShapeUnpickler(handle).load()
    except (pickle.UnpicklingError, ValueError, EOFError, OSError, zipfile.BadZipFile, TypeError) as err:
        raise CheckpointError(
            f"{path} is not a readable PyTorch state dict ({err}); it may hold objects other than tensors, "
            "or be truncated.",
            hint="Use safetensors weights, or download the file again.",
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, _TensorRecord) for v in state.values()):
        raise CheckpointError(
            f"{path} holds {type(state).__name__} with entries other than tensors, not a state dict.",
            hint="Use safetensors weights, or a pytorch_model.bin written from a state dict.",
        )
    return {str(k): list(v.shape) for k, v in state.items()}


def _weights(path: Path) -> tuple[tuple[str, ...], dict[str, list[int]], str]:
    """The weight files, every tensor's shape, and the format (`safetensors`,
    or `pickle` when there are only `pytorch_model*.bin` files)."""
    files = tuple(sorted(p.name for p in path.glob("*.safetensors")))
    shapes: dict[str, list[int]] = {}
    if files:
        for name in files:
            for key, value in safetensors_header(path / name).items():
                if key != "__metadata__":
                    shapes[key] = list(value["shape"])
        return files, shapes, "safetensors"
    pickles = pickle_weight_files(path)
    if not pickles:
        raise CheckpointError(
            f"{path} has no safetensors weights (and no pytorch_model*.bin either).",
            hint="Copy the weight files next to config.json.",
        )
    for name in pickles:
        shapes.update(pickle_shapes(path / name))
    return pickles, shapes, "pickle"


def _count(shapes: dict[str, list[int]], awq: bool) -> tuple[int, int]:
    total = vision = 0
    for key, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        if awq and key.endswith(".qweight"):
            n *= 8  # eight 4-bit values per int32
        elif awq and key.endswith((".qzeros", ".scales")):
            continue
        total += n
        if key.startswith(_VISION_PREFIXES):
            vision += n
    return total, vision


def _vision_name(hidden: int, params: int) -> str:
    named = {1024: "InternViT-300M", 3200: "InternViT-6B"}
    return named.get(hidden, f"InternViT ({params / 1e6:.2g}M parameters)")


def _template_from_chat_template(path: Path, tok_cfg: dict[str, Any]) -> str | None:
    text = tok_cfg.get("chat_template")
    jinja = path / "chat_template.jinja"
    if not isinstance(text, str) and jinja.is_file():
        text = jinja.read_text()
    if not isinstance(text, str):
        return None
    if "<|end|>" in text and "<|user|>" in text:
        return "phi3-chat"
    if "<|im_start|>" not in text:
        return None
    # InternVL2.5 and later end each turn with "<|im_end|>" and a newline; the
    # InternVL2-era ChatML templates with "<|im_end|>" alone.
    return "internvl2_5" if ("<|im_end|>\\n" in text or "<|im_end|>\n" in text) else "internlm2-chat"


def describe_checkpoint(path: str | Path) -> LocalCheckpoint:
    """Describe the checkpoint at `path`, or raise `CheckpointError` naming
    what was expected and what was found."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory.", hint="Point --model-path at a checkpoint directory.")
    if not (root / "config.json").is_file():
        found = sorted(p.name for p in root.iterdir())[:6]
        raise CheckpointError(
            f"{root} is not an InternVL checkpoint: it has no config.json"
            + (f" (found {', '.join(found)})" if found else " (it is empty)")
            + ".",
            hint="Expected config.json, safetensors weights and tokenizer files.",
        )
    config = _read_json(root / "config.json", "config.json")
    archs = config.get("architectures") or []
    prov: dict[str, str] = {}
    if "InternVLForConditionalGeneration" in archs:
        shuffle = str(config.get("internvl_launch_pixel_shuffle", "v2"))
        prov["pixel_shuffle"] = "config.json internvl_launch_pixel_shuffle" if shuffle == "v1" else "native layout: v2"
        return replace(_describe_native(root, config, prov), pixel_shuffle=shuffle)
    if "InternVLChatModel" in archs or "llm_config" in config:
        # The original code reads an absent ps_version as v1.
        shuffle = str(config.get("ps_version", "v1"))
        prov["pixel_shuffle"] = "config.json ps_version" if "ps_version" in config else "ps_version absent: v1"
        return replace(_describe_original(root, config, prov), pixel_shuffle=shuffle)
    raise CheckpointError(
        f"{root} is not an InternVL checkpoint: config.json names "
        f"{', '.join(map(str, archs)) or 'no architecture'} (model_type {config.get('model_type', 'unset')}).",
        hint="Expected architectures InternVLChatModel (original layout) or InternVLForConditionalGeneration "
        "(Transformers-native layout).",
    )


def _describe_original(root: Path, config: dict[str, Any], prov: dict[str, str]) -> LocalCheckpoint:
    from internvl_launch.prompt.templates import TEMPLATES

    llm = config.get("llm_config")
    vit = config.get("vision_config")
    if not isinstance(llm, dict) or not isinstance(vit, dict):
        raise CheckpointError(f"{root}/config.json has InternVLChatModel but lacks llm_config or vision_config.")
    llm_arch = (llm.get("architectures") or ["unset"])[0]
    if llm_arch not in ORIGINAL_ARCHS:
        raise CheckpointError(
            f"{root} has a {llm_arch} language model; InternVL checkpoints use {', '.join(sorted(ORIGINAL_ARCHS))}.",
        )
    arch = ORIGINAL_ARCHS[llm_arch]
    prov["layout"] = "config.json architectures: InternVLChatModel (original; converted on first use)"
    prov["llm"] = f"config.json llm_config.architectures: {llm_arch}"
    template = config.get("template")
    if template in TEMPLATES:
        prov["template"] = "config.json template"
    else:
        template = "phi3-chat" if arch == "phi3" else "internlm2-chat"
        prov["template"] = f"not in config.json: the {arch} default"
    max_tiles = _tile_limit(
        config.get("max_dynamic_patch"),
        prov,
        found="config.json max_dynamic_patch",
        default=6,
        missing="not in config.json: InternVLChatConfig's default, 6",
    )
    system = config.get("system_message") if isinstance(config.get("system_message"), str) else None
    prov["system_message"] = "config.json system_message" if system is not None else f"the {template} default"
    fmt = _format(config.get("quantization_config") or llm.get("quantization_config"), prov)
    return _finish(root, "original", arch, llm, llm_arch, vit, template, system, max_tiles, fmt, prov)


def _tile_limit(value: Any, prov: dict[str, str], *, found: str, default: int, missing: str) -> int:
    """The tile limit a checkpoint declares (a positive int), else the layout's default; where it came from goes in prov."""
    if isinstance(value, int) and value > 0:
        prov["max_tiles"] = found
        return value
    prov["max_tiles"] = missing
    return default


def _format(quant: Any, prov: dict[str, str]) -> str:
    if isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == "awq":
        prov["format"] = "config.json quantization_config: awq"
        return "awq"
    prov["format"] = "no AWQ quantization_config: pytorch"
    return "pytorch"


def _describe_native(root: Path, config: dict[str, Any], prov: dict[str, str]) -> LocalCheckpoint:
    text = config.get("text_config") or {}
    vit = config.get("vision_config") or {}
    model_type = text.get("model_type", "unset")
    if model_type not in _NATIVE_TEXT:
        raise CheckpointError(
            f"{root} has a {model_type} text model; native InternVL checkpoints use {', '.join(_NATIVE_TEXT)}.",
        )
    prov["layout"] = "config.json architectures: InternVLForConditionalGeneration (native)"
    marker = root / CONVERSION_MARKER
    converted = _read_json(marker, CONVERSION_MARKER) if marker.is_file() else {}
    arch = _NATIVE_TEXT[model_type]
    if converted.get("backbone"):
        arch = converted["backbone"]
        prov["llm"] = f"{CONVERSION_MARKER}: converted from {arch}"
    else:
        prov["llm"] = f"config.json text_config.model_type: {model_type}"
    tok_path = root / "tokenizer_config.json"
    tok_cfg = _read_json(tok_path, "tokenizer_config.json") if tok_path.is_file() else {}
    template = converted.get("template")
    if template:
        prov["template"] = f"{CONVERSION_MARKER} template"
    else:
        template = _template_from_chat_template(root, tok_cfg)
        if template:
            prov["template"] = "the tokenizer's chat template"
        else:
            template = "phi3-chat" if arch == "phi3" else "internvl2_5"
            prov["template"] = f"no chat template: the {arch} default"
    pre_path = root / "preprocessor_config.json"
    pre = _read_json(pre_path, "preprocessor_config.json") if pre_path.is_file() else {}
    max_tiles = _tile_limit(
        pre.get("max_patches"),
        prov,
        found="preprocessor_config.json max_patches",
        default=12,
        missing="no preprocessor_config.json: 12",
    )
    system = converted.get("system_message") if isinstance(converted.get("system_message"), str) else None
    prov["system_message"] = f"{CONVERSION_MARKER} system_message" if system else f"the {template} default"
    fmt = _format(config.get("quantization_config"), prov)
    return _finish(root, "native", arch, text, model_type, vit, template, system, max_tiles, fmt, prov)


def _finish(
    root: Path,
    layout: str,
    arch: str,
    lm: dict[str, Any],
    lm_fallback_name: str,
    vit: dict[str, Any],
    template: str,
    system: str | None,
    max_tiles: int,
    fmt: str,
    prov: dict[str, str],
) -> LocalCheckpoint:
    """The description, once the layout-specific values are known: the
    weights are counted here and the language model's shape read from `lm`."""
    files, shapes, weight_format = _weights(root)
    total, vision = _count(shapes, fmt == "awq")
    where = "safetensors headers" if weight_format == "safetensors" else "pickle files' tensor records"
    prov["size"] = f"counted: {total:,} parameters in the {where}" + (
        " (8 per int32 of an AWQ qweight)" if fmt == "awq" else ""
    )
    heads = int(lm.get("num_attention_heads", 1))
    return LocalCheckpoint(
        path=root,
        layout=layout,
        arch=arch,
        llm_name=str(lm.get("_name_or_path") or lm_fallback_name).rstrip("/").rsplit("/", 1)[-1],
        layers=int(lm.get("num_hidden_layers", 1)),
        attention_heads=heads,
        kv_heads=int(lm.get("num_key_value_heads") or heads),
        head_dim=int(lm.get("head_dim") or int(lm.get("hidden_size", heads)) // heads),
        vision_name=_vision_name(int(vit.get("hidden_size", 0)), vision),
        vision_params=vision,
        parameters=total,
        template=template,
        system_message=system,
        max_tiles=max_tiles,
        context_length=int(lm.get("max_position_embeddings", 8192)),
        format=fmt,
        weight_files=files,
        provenance=prov,
    )
