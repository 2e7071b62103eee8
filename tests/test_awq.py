"""AWQ (GEMM layout) weights: packing, dequantization, regrouping output
channels in packed form, and the conversion of AWQ original-layout
checkpoints, checked against the float path: converting and then
dequantizing must compute what dequantizing and then converting computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from internvl_launch.checkpoint.awq import (
    AWQ_ORDER,
    dequantize_awq,
    dequantize_checkpoint_awq,
    pack_awq,
    pack_int4,
    quantize_checkpoint_awq,
    select_awq_output_blocks,
    select_output_blocks,
    unpack_awq,
)
from internvl_launch.checkpoint.convert import WeightMapper, convert, inspect_original, load_dequantized
from internvl_launch.checkpoint.local import describe_checkpoint
from internvl_launch.checkpoint.tiny_original import TinyOriginalConfig, fidelity_inputs, generate_tiny_original
from internvl_launch.errors import CheckpointError

#: In-features of every decoder Linear (hidden 128, intermediate 256, 8 x 16
#: query channels) are multiples of the group size 128; InternLM2 has
#: grouped-query attention (8 query heads, 2 key/value heads of 16 channels:
#: two packed columns per head).
CONFIGS = {
    "internlm2": TinyOriginalConfig(backbone="internlm2", text_heads=8, text_kv_heads=2),
    "qwen2": TinyOriginalConfig(backbone="qwen2"),
    "phi3": TinyOriginalConfig(backbone="phi3"),
}
SAME = 1e-5


def _int32(value: int) -> int:
    return value - 2**32 if value >= 2**31 else value


# --- packing ----------------------------------------------------------------------------


def test_each_nibble_holds_the_channel_awq_orders_it_in() -> None:
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    # Nibble i (bits 4i..4i+3) holds the value i: channel AWQ_ORDER[i] gets i.
    packed = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_awq(packed).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]
    # The top nibble set (a negative int32) is channel 7 alone.
    top = torch.tensor([[_int32(0xF0000000)]], dtype=torch.int32)
    assert unpack_awq(top).tolist() == [[0, 0, 0, 0, 0, 0, 0, 15]]
    # Channels 0..7 holding 0..7 pack to nibbles 0, 2, 4, 6, 1, 3, 5, 7.
    assert pack_int4(torch.arange(8).reshape(1, 8)).item() == 0x75316420
    assert pack_int4(torch.full((1, 8), 15)).item() == -1


def test_pack_then_unpack_returns_every_value() -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(0, 16, (37, 64), generator=gen)
    packed = pack_int4(values)
    assert packed.dtype == torch.int32 and packed.shape == (37, 8)
    assert torch.equal(unpack_awq(packed), values.to(torch.int32))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(values[:, :12])
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(values + 1)


def test_pack_awq_has_the_gemm_shapes_and_dequantizes_within_half_a_step() -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(192, 384, generator=gen) * torch.linspace(0.01, 3.0, 192).unsqueeze(1)
    qweight, qzeros, scales = pack_awq(weight, 128)
    assert (qweight.dtype, tuple(qweight.shape)) == (torch.int32, (384, 24))
    assert (qzeros.dtype, tuple(qzeros.shape)) == (torch.int32, (3, 24))
    assert (scales.dtype, tuple(scales.shape)) == (torch.float16, (3, 192))
    restored = dequantize_awq(qweight, qzeros, scales, 128)
    assert restored.shape == weight.shape and restored.dtype == torch.float32
    step = scales.float().repeat_interleave(128, dim=0).t()  # (out, in), the step of each element's group
    error = (restored - weight).abs()
    assert bool((error <= 0.51 * step).all()), float((error / step).max())
    assert float(error.max()) > 0  # it did quantize
    # Zeros stay zero, and a constant group whose step (value / 15) is a float16 comes back exactly.
    flat = torch.zeros(8, 128)
    flat[:4] = 0.9375
    assert torch.equal(dequantize_awq(*pack_awq(flat, 128), 128), flat)


def test_dequantize_awq_refuses_tensors_that_do_not_fit() -> None:
    qweight, qzeros, scales = pack_awq(torch.randn(16, 256), 128)
    with pytest.raises(ValueError, match="group_size 64"):
        dequantize_awq(qweight, qzeros, scales, 64)
    with pytest.raises(ValueError, match="do not fit"):
        dequantize_awq(qweight, qzeros, scales[:, :8], 128)


def test_output_blocks_move_as_whole_packed_columns() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 128, generator=gen)  # four blocks of 16 output channels
    triple = pack_awq(weight, 128)
    order = [2, 0, 3]
    moved = dequantize_awq(*select_awq_output_blocks(*triple, 16, order), 128)
    expected = dequantize_awq(*triple, 128).reshape(4, 16, 128)[order].reshape(-1, 128)
    assert torch.equal(moved, expected)
    bias = torch.arange(64.0)
    assert select_output_blocks(bias, 16, [3], packed=False).tolist() == list(range(48, 64))
    with pytest.raises(ValueError, match="whole number of packed"):
        select_output_blocks(triple[0], 12, [0], packed=True)


# --- AWQ original-layout checkpoints -----------------------------------------------------


@pytest.fixture(scope="module")
def awq_originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("awq")
    out = {}
    for name, config in CONFIGS.items():
        floats = generate_tiny_original(root / f"{name}-float", config)
        out[name] = quantize_checkpoint_awq(floats, root / name, group_size=128)
    return out


def _logits(model: torch.nn.Module, tokenizer_dir: Path) -> torch.Tensor:
    added = {t["content"]: t["id"] for t in json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]}
    ids, pixels = fidelity_inputs(added["<IMG_CONTEXT>"], added["<img>"], added["</img>"])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits[0]


def _float_logits(path: Path) -> torch.Tensor:
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return _logits(model, path)


def _converted_then_dequantized(path: Path) -> torch.Tensor:
    model, info = load_dequantized(path)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return _logits(model, path)


def test_the_replica_quantizes_only_decoder_linears(awq_originals: dict[str, Path]) -> None:
    for name, path in awq_originals.items():
        tensors = load_file(path / "model.safetensors")
        quantized = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")}
        assert quantized and all(p.startswith("language_model.model.layers.") for p in quantized), name
        assert not any(f"{p}.weight" in tensors for p in quantized)
        assert all(tensors[f"{p}.qzeros"].dtype == torch.int32 for p in quantized)
        head = "language_model.output.weight" if name == "internlm2" else "language_model.lm_head.weight"
        assert tensors[head].is_floating_point()
        assert any(k.startswith("vision_model.") and k.endswith(".weight") for k in tensors)
        llm = json.loads((path / "config.json").read_text())["llm_config"]
        assert llm["quantization_config"] == {
            "quant_method": "awq",
            "bits": 4,
            "group_size": 128,
            "version": "gemm",
            "zero_point": True,
        }
    fused = load_file(awq_originals["phi3"] / "model.safetensors")
    assert "language_model.model.layers.0.self_attn.qkv_proj.qweight" in fused
    assert "language_model.model.layers.0.mlp.gate_up_proj.qweight" in fused
    internlm2 = load_file(awq_originals["internlm2"] / "model.safetensors")
    assert internlm2["language_model.model.layers.0.attention.wqkv.qweight"].shape == (128, (8 + 2 * 2) * 16 // 8)


def test_the_awq_wqkv_split_equals_the_float_split_of_the_dequantized_weight(
    awq_originals: dict[str, Path],
) -> None:
    src = inspect_original(awq_originals["internlm2"])
    mapper = WeightMapper(src)
    tensors = load_file(src.path / "model.safetensors")
    prefix = "language_model.model.layers.1.attention.wqkv"
    parts = {k: mapper.split_wqkv_awq(tensors[f"{prefix}.{k}"], k) for k in ("qweight", "qzeros", "scales")}
    floats = mapper.split_wqkv(
        dequantize_awq(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"])
    )
    for i, (name, expected) in enumerate(zip(("q", "k", "v"), floats, strict=True)):
        got = dequantize_awq(parts["qweight"][i], parts["qzeros"][i], parts["scales"][i])
        assert got.shape == expected.shape == ((8 if name == "q" else 2) * 16, 128)
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("backbone", sorted(CONFIGS))
def test_converted_then_dequantized_computes_what_dequantized_then_converted_computes(
    awq_originals: dict[str, Path], tmp_path: Path, backbone: str
) -> None:
    report = convert(awq_originals[backbone], tmp_path / "awq-native", verify=backbone == "internlm2")
    native = tmp_path / "awq-native"
    floats = dequantize_checkpoint_awq(awq_originals[backbone], tmp_path / "float-original")
    float_report = convert(floats, tmp_path / "float-native", verify=False)
    got = _converted_then_dequantized(native)
    expected = _float_logits(tmp_path / "float-native")
    assert float((got - expected).abs().max()) <= SAME
    assert float(expected.abs().max()) > 1.0  # the logits are not trivially zero
    # One parameter count for both: 8 per int32 of a qweight, none for qzeros/scales.
    assert report.parameters == float_report.parameters
    config = json.loads((native / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "awq" and quant["bits"] == 4 and quant["group_size"] == 128
    assert quant["zero_point"] is True and quant["version"] == "gemm"
    assert {"vision_tower", "multi_modal_projector", "lm_head"} <= set(quant["modules_to_not_convert"])
    assert "model.vision_tower" in quant["modules_to_not_convert"]  # how Transformers names the module
    assert "quantization_config" not in config["text_config"]
    tensors = load_file(native / "model.safetensors")
    assert not any(".wqkv." in k or k.startswith(("vision_model.", "mlp1.")) for k in tensors)
    assert all(tensors[k].dtype == torch.int32 for k in tensors if k.endswith((".qweight", ".qzeros")))
    assert all(tensors[k].dtype == torch.float16 for k in tensors if k.endswith(".scales"))
    assert tensors["language_model.lm_head.weight"].is_floating_point()
    if backbone == "internlm2":
        assert report.verified and any("dequantized" in note for note in report.notes)
        layer = "language_model.model.layers.0.self_attn."
        assert tensors[layer + "q_proj.qweight"].shape == (128, 8 * 16 // 8)
        assert tensors[layer + "k_proj.scales"].shape == (1, 2 * 16)
        assert report.mapped["internlm2 wqkv split"] == 2 * 3
    if backbone == "phi3":
        assert "language_model.model.layers.0.self_attn.qkv_proj.qweight" in tensors
        assert "language_model.model.layers.0.mlp.gate_up_proj.qweight" in tensors


def test_a_naive_split_of_the_packed_wqkv_is_caught(
    awq_originals: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cutting the AWQ wqkv into [q; k; v] columns must change the logits far
    beyond the tolerance, so the equality above means the split is right."""
    convert(awq_originals["internlm2"], tmp_path / "right", verify=False)
    right = _converted_then_dequantized(tmp_path / "right")

    def naive(self: WeightMapper, tensor: torch.Tensor, kind: str) -> tuple[torch.Tensor, ...]:
        unit = 1 if kind == "scales" else 8
        q, kv = self.heads * self.head_dim // unit, self.kv_heads * self.head_dim // unit
        return tuple(part.contiguous() for part in (tensor[:, :q], tensor[:, q : q + kv], tensor[:, q + kv :]))

    monkeypatch.setattr(WeightMapper, "split_wqkv_awq", naive)
    convert(awq_originals["internlm2"], tmp_path / "wrong", verify=False)
    wrong = _converted_then_dequantized(tmp_path / "wrong")
    assert float((wrong - right).abs().max()) > 1e-2


def test_a_head_dim_that_does_not_fill_packed_columns_is_refused(tmp_path: Path) -> None:
    # 32 heads of 4 channels: a head is half a packed column.
    config = TinyOriginalConfig(backbone="internlm2", text_heads=32, text_kv_heads=2)
    src = quantize_checkpoint_awq(generate_tiny_original(tmp_path / "f", config), tmp_path / "awq")
    with pytest.raises(CheckpointError, match="head_dim 4 is not a multiple of 8"):
        convert(src, tmp_path / "out", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq", "f"]


def test_dtype_never_casts_the_packed_integers(awq_originals: dict[str, Path], tmp_path: Path) -> None:
    report = convert(awq_originals["qwen2"], tmp_path / "out", dtype="bfloat16", verify=False)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    ints = {k for k in tensors if k.endswith((".qweight", ".qzeros"))}
    assert ints and all(tensors[k].dtype == torch.int32 for k in ints)
    assert {tensors[k].dtype for k in tensors if k not in ints} == {torch.bfloat16}
    assert report.dtype == "bfloat16"


def test_other_quantization_methods_and_layouts_are_named(awq_originals: dict[str, Path], tmp_path: Path) -> None:
    for quant, message in (
        ({"quant_method": "gptq", "bits": 4}, "quantized with gptq"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version 'gemv'"),
    ):
        src = tmp_path / quant["quant_method"] / str(quant.get("version"))
        src.mkdir(parents=True)
        for f in awq_originals["qwen2"].iterdir():
            (src / f.name).write_bytes(f.read_bytes())
        config = json.loads((src / "config.json").read_text())
        config["llm_config"]["quantization_config"] = quant
        (src / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=message):
            inspect_original(src)


def test_describe_counts_awq_parameters_like_the_float_checkpoint(
    awq_originals: dict[str, Path], tmp_path: Path
) -> None:
    src = awq_originals["internlm2"]
    floats = generate_tiny_original(tmp_path / "float", CONFIGS["internlm2"])
    awq, plain = describe_checkpoint(src), describe_checkpoint(floats)
    assert awq.format == "awq" and plain.format == "pytorch"
    assert awq.parameters == plain.parameters and awq.vision_params == plain.vision_params
    assert "8 per int32" in awq.provenance["size"]
    pickled = quantize_checkpoint_awq(floats, tmp_path / "pickled", pickle=True)
    assert not list(pickled.glob("*.safetensors"))
    described = describe_checkpoint(pickled)
    assert described.weight_files == ("pytorch_model.bin",) and described.parameters == plain.parameters
    assert "pickle" in described.provenance["size"]


def test_an_awq_pickle_converts_without_allow_pickle(awq_originals: dict[str, Path], tmp_path: Path) -> None:
    floats = generate_tiny_original(tmp_path / "float", CONFIGS["qwen2"])
    pickled = quantize_checkpoint_awq(floats, tmp_path / "pickled", pickle=True)
    report = convert(pickled, tmp_path / "from-pickle", verify=False)
    assert any("weights_only=True" in note for note in report.notes)
    convert(awq_originals["qwen2"], tmp_path / "from-safetensors", verify=False)
    a = load_file(tmp_path / "from-pickle" / "model.safetensors")
    b = load_file(tmp_path / "from-safetensors" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
