"""AWQ 4-bit weights in the "GEMM" layout, as OpenGVLab's `*-AWQ` checkpoints store them.

A quantized `Linear(in_features, out_features)` is three tensors:

* `qweight`: int32 `(in_features, out_features // 8)`, eight 4-bit values per int32;
* `qzeros`: int32 `(in_features // group_size, out_features // 8)`, packed the same way;
* `scales`: float16 `(in_features // group_size, out_features)`.

Within one int32 of packed column `c`, nibble `i` (bits `4i .. 4i+3`) holds
output channel `c * 8 + AWQ_ORDER[i]`. The transposed weight is
`W^T[i, o] = (q[i, o] - z[i // group_size, o]) * s[i // group_size, o]`.

The output dimension is dim 1 of all three tensors: in units of 8 channels
(one packed column) for `qweight` and `qzeros`, in channels for `scales`. So
output channels can be regrouped without unpacking as long as every block
moved is a whole number of packed columns (`select_output_blocks`).

Everything here is plain tensor arithmetic on CPU; no AWQ kernel is needed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Which output channel (within its packed column) each nibble holds.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: 4-bit values per int32.
PACK = 8
BITS = 4
#: The suffixes of a quantized Linear's tensors.
TRIPLE = ("qweight", "qzeros", "scales")

_INVERSE_ORDER = tuple(AWQ_ORDER.index(channel) for channel in range(PACK))


def _torch() -> Any:
    import torch

    return torch


def pack_int4(values: Any) -> Any:
    """Pack `values` (integers in [0, 15], shape `(rows, cols)`, `cols` a
    multiple of 8) into int32 `(rows, cols // 8)` in AWQ's nibble order.
    `unpack_awq(pack_int4(v))` returns `v`."""
    torch = _torch()
    if values.dim() != 2 or values.shape[1] % PACK:
        raise ValueError(
            f"pack_int4 needs a 2-D tensor whose columns are a multiple of {PACK}, got {tuple(values.shape)}"
        )
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 15):
        raise ValueError("pack_int4 packs values in [0, 15]")
    grouped = v.reshape(v.shape[0], -1, PACK)
    packed = torch.zeros(grouped.shape[:2], dtype=torch.int64)
    for nibble, channel in enumerate(AWQ_ORDER):
        packed |= grouped[..., channel] << (BITS * nibble)
    # Two's complement into int32 without relying on how a narrowing cast overflows.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_awq(packed: Any) -> Any:
    """Unpack an AWQ-packed int32 tensor `(rows, cols)` into its 4-bit values
    as int32 `(rows, cols * 8)`, output channels in natural order."""
    torch = _torch()
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"unpack_awq needs a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(0, BITS * PACK, BITS, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [..., i] is channel AWQ_ORDER[i]
    natural = nibbles[..., list(_INVERSE_ORDER)]
    return natural.reshape(packed.shape[0], -1)


def pack_awq(weight: Any, group_size: int = 128) -> tuple[Any, Any, Any]:
    """Quantize a float Linear weight `(out_features, in_features)` to AWQ GEMM
    tensors `(qweight, qzeros, scales)`: asymmetric 4-bit, one scale and one
    zero point per group of `group_size` input channels and per output channel.

    Each group's range is widened to include 0, so every zero point lies in
    [0, 15], zeros stay exactly zero and a constant group keeps its value up
    to the float16 rounding of its scale. The error of `dequantize_awq` is at
    most half a step (`scale / 2`, plus the float16 rounding of the scale)
    per element."""
    torch = _torch()
    if weight.dim() != 2:
        raise ValueError(f"pack_awq needs a 2-D weight (out, in), got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if in_features % group_size or out_features % PACK:
        raise ValueError(
            f"pack_awq needs in_features ({in_features}) a multiple of group_size ({group_size}) "
            f"and out_features ({out_features}) a multiple of {PACK}"
        )
    w = weight.detach().to(torch.float32).t().reshape(in_features // group_size, group_size, out_features)
    low = w.amin(dim=1).clamp(max=0.0)
    high = w.amax(dim=1).clamp(min=0.0)
    scales = ((high - low).clamp(min=1e-4) / 15.0).to(torch.float16)
    step = scales.to(torch.float32)
    zeros = torch.round(-low / step).clamp(0, 15)
    q = torch.round(w / step.unsqueeze(1) + zeros.unsqueeze(1)).clamp(0, 15)
    qweight = pack_int4(q.reshape(in_features, out_features))
    qzeros = pack_int4(zeros)
    return qweight, qzeros, scales


def dequantize_awq(qweight: Any, qzeros: Any, scales: Any, group_size: int = 128, dtype: Any = None) -> Any:
    """The float weight `(out_features, in_features)` that AWQ tensors encode,
    in `dtype` (float32 by default), computed in float32. Raises `ValueError`
    when the three shapes do not describe one Linear with this group size."""
    torch = _torch()
    in_features, columns = qweight.shape
    out_features = columns * PACK
    groups = in_features // group_size if group_size > 0 else 0
    if (
        group_size <= 0
        or in_features % group_size
        or tuple(qzeros.shape) != (groups, columns)
        or tuple(scales.shape) != (groups, out_features)
    ):
        raise ValueError(
            f"AWQ tensors do not fit together with group_size {group_size}: qweight {tuple(qweight.shape)}, "
            f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}"
        )
    q = unpack_awq(qweight).to(torch.float32)
    z = unpack_awq(qzeros).to(torch.float32).repeat_interleave(group_size, dim=0)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=0)
    weight = ((q - z) * s).t().contiguous()
    return weight.to(dtype or torch.float32)


def select_output_blocks(tensor: Any, block: int, blocks: Sequence[int], *, packed: bool) -> Any:
    """The output channels of one AWQ tensor regrouped by blocks: the result
    holds blocks `blocks[0], blocks[1], ...` (each `block` output channels
    wide, counted from 0) side by side along dim 1.

    For `qweight`/`qzeros` (`packed=True`) a block is `block // 8` packed
    columns, moved whole, so `block` must be a multiple of 8; for `scales`
    (and a bias, which is 1-D) it is `block` channels."""
    if packed and block % PACK:
        raise ValueError(f"a block of {block} output channels is not a whole number of packed {PACK}-channel columns")
    unit = block // PACK if packed else block
    if tensor.dim() == 1:
        return tensor.reshape(-1, unit)[list(blocks)].reshape(-1).contiguous()
    if tensor.shape[1] % unit:
        raise ValueError(f"dim 1 of {tuple(tensor.shape)} is not a whole number of {unit}-column blocks")
    rows = tensor.shape[0]
    return tensor.reshape(rows, -1, unit)[:, list(blocks)].reshape(rows, -1).contiguous()


def select_awq_output_blocks(
    qweight: Any, qzeros: Any, scales: Any, block: int, blocks: Sequence[int]
) -> tuple[Any, Any, Any]:
    """`select_output_blocks` applied to a whole AWQ triple: the triple of the
    Linear whose output channels are the chosen blocks, in that order.
    Splitting a fused projection is one call per part; permuting is one call
    with every block once."""
    return (
        select_output_blocks(qweight, block, blocks, packed=True),
        select_output_blocks(qzeros, block, blocks, packed=True),
        select_output_blocks(scales, block, blocks, packed=False),
    )


def is_awq_config(quant: Any) -> bool:
    """Whether a `quantization_config` value describes AWQ."""
    return isinstance(quant, Mapping) and str(quant.get("quant_method", "")).lower() == "awq"


def dequantize_state_dict(tensors: Mapping[str, Any], group_size: int, dtype: Any = None) -> dict[str, Any]:
    """A copy of `tensors` in which every complete AWQ triple
    (`P.qweight`, `P.qzeros`, `P.scales`) is replaced by the float `P.weight`
    it encodes (in `dtype`, float32 by default). Other tensors are kept as
    they are; an incomplete triple is kept too, so a loader reports it."""
    out: dict[str, Any] = {}
    prefixes = {k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")}
    complete = {p for p in prefixes if all(f"{p}.{s}" in tensors for s in TRIPLE)}
    for key, value in tensors.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in complete and leaf in TRIPLE:
            if leaf == "qweight":
                out[f"{prefix}.weight"] = dequantize_awq(
                    value, tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"], group_size, dtype
                )
            continue
        out[key] = value
    return out


def awq_parameter_count(shapes: Iterable[tuple[str, Sequence[int]]]) -> int:
    """Parameters a state dict of `(name, shape)` pairs stands for when it
    holds AWQ tensors: 8 per int32 of `qweight`, none for `qzeros`/`scales`
    (they describe the same weights)."""
    total = 0
    for key, shape in shapes:
        n = 1
        for d in shape:
            n *= int(d)
        if key.endswith(".qweight"):
            total += n * PACK
        elif not key.endswith((".qzeros", ".scales")):
            total += n
    return total


# --- the replica generator: float original-layout checkpoint -> AWQ original layout ------------------


def _is_decoder_linear(name: str, tensor: Any) -> bool:
    """A language-model decoder Linear weight: what LMDeploy's auto_awq
    quantizes (not embeddings, the output head, the vision tower or mlp1)."""
    return name.startswith("language_model.model.layers.") and name.endswith(".weight") and tensor.dim() == 2


def quantize_checkpoint_awq(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    group_size: int = 128,
    pickle: bool = False,
    dtype: str | None = None,
) -> Path:
    """Write an AWQ original-layout copy of the float original-layout
    checkpoint at `source` (one `model.safetensors`) to `destination`.

    Every language-model decoder Linear weight becomes a `qweight`/`qzeros`/
    `scales` triple made by `pack_awq` (its bias, if any, is kept as is);
    embeddings, the output head, the vision tower and `mlp1` stay float, as in
    OpenGVLab's `*-AWQ` repositories. `llm_config.quantization_config` says
    so. The weights go to `model.safetensors`, or to `pytorch_model.bin`
    (`torch.save` of the state dict) with `pickle=True`. With `dtype`, the
    tensors left float are cast to it (the scales stay float16). The other
    files of `source` are copied."""
    torch = _torch()
    from safetensors.torch import load_file, save_file

    src, dst = Path(source), Path(destination)
    dst.mkdir(parents=True, exist_ok=True)
    cast = getattr(torch, dtype) if dtype else None
    tensors = load_file(src / "model.safetensors")
    out: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if _is_decoder_linear(name, tensor):
            prefix = name.removesuffix(".weight")
            qweight, qzeros, scales = pack_awq(tensor, group_size)
            out[f"{prefix}.qweight"], out[f"{prefix}.qzeros"], out[f"{prefix}.scales"] = qweight, qzeros, scales
        else:
            out[name] = tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor
    for file in src.iterdir():
        if file.is_file() and file.name not in ("model.safetensors", "config.json"):
            shutil.copy2(file, dst / file.name)
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["quantization_config"] = {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": group_size,
        "version": "gemm",
        "zero_point": True,
    }
    if dtype:
        config["torch_dtype"] = config["llm_config"]["torch_dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if pickle:
        torch.save(out, dst / "pytorch_model.bin")
    else:
        save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def dequantize_checkpoint_awq(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> Path:
    """Write a float copy of the AWQ checkpoint at `source` (either layout,
    one `model.safetensors`) to `destination`: every triple dequantized to
    float32 and `quantization_config` removed from the config (top level,
    `llm_config` and `text_config`). The other files are copied."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(source), Path(destination)
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    quant = config.pop("quantization_config", None)
    for sub in ("llm_config", "text_config"):
        if isinstance(config.get(sub), dict):
            quant = config[sub].pop("quantization_config", None) or quant
    if not is_awq_config(quant):
        raise ValueError(f"{src} has no AWQ quantization_config")
    tensors = dequantize_state_dict(load_file(src / "model.safetensors"), int(quant["group_size"]))
    for file in src.iterdir():
        if file.is_file() and file.name not in ("model.safetensors", "config.json"):
            shutil.copy2(file, dst / file.name)
    (dst / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
