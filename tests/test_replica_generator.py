"""The replicas have the real repositories' structure: what the facts file
says about each repository is what its replica holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from internvl_launch.checkpoint.local import safetensors_header
from internvl_launch.checkpoint.replica import PLACEHOLDER, generate_replica, load_facts, tiny_dimensions

FACTS = load_facts()


def weight_names(directory: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of the replica: name -> (dtype, shape), read without torch for safetensors."""
    out: dict[str, tuple[str, list[int]]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        for name, info in safetensors_header(file).items():
            if name != "__metadata__":
                out[name] = (info["dtype"], info["shape"])
    if not out:
        import torch

        for file in sorted(directory.glob("pytorch_model*.bin")):
            for name, tensor in torch.load(file, weights_only=True).items():
                out[name] = (str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
    return out


@pytest.mark.parametrize("repo_id", sorted(FACTS))
def test_replica_has_the_structure_of_its_repository(repo_id: str, tmp_path: Path) -> None:
    facts = FACTS[repo_id]
    if facts.quantization and facts.quantization["quant_method"] != "awq":
        with pytest.raises(ValueError, match="no engine here reads"):
            generate_replica(repo_id, tmp_path / "r")
        return
    out = generate_replica(repo_id, tmp_path / "r")
    files = {p.name for p in out.iterdir()}
    if facts.layout == "native":
        # A -hf twin: Transformers' layout, no remote code, processor files beside the weights.
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["InternVLForConditionalGeneration"]
        assert config["text_config"]["num_attention_heads"] == facts.llm["num_attention_heads"]
        assert config["vision_config"]["num_attention_heads"] == facts.vision["num_attention_heads"]
        assert {"tokenizer.json", "preprocessor_config.json"} <= files and not [f for f in files if f.endswith(".py")]
        assert any(f.endswith(".safetensors") for f in files)
        return
    # Weights: format, shard count, index.
    stem, ext = ("pytorch_model", "bin") if facts.weights == "pickle" else ("model", "safetensors")
    shards = sorted(f for f in files if f.endswith("." + ext))
    assert shards, files
    count = min(facts.shards, len(weight_names(out)))  # a replica has fewer tensors than 97 shards
    if facts.shards > 1:
        assert shards == [f"{stem}-{i:05d}-of-{count:05d}.{ext}" for i in range(1, count + 1)]
        index = json.loads((out / f"{stem}.{ext}.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards)
    else:
        assert shards == [f"{stem}.{ext}"] and f"{stem}.{ext}.index.json" not in files
    # Remote code is present, as placeholders that do nothing.
    for name in facts.code_files:
        assert (out / name).read_text() == PLACEHOLDER
    # Tokenizer of the real kind.
    kind = facts.tokenizer
    assert ("tokenizer.model" in files) == kind.endswith("sentencepiece")
    assert ("tokenizer.json" in files) == (kind == "bpe-tokenizer-json")
    if kind == "bpe-vocab-merges":
        assert {"vocab.json", "merges.txt"} <= files
    # config.json: the real keys and head counts, shrunk widths.
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"]
    for key in ("template", "ps_version", "max_dynamic_patch", "downsample_ratio", "force_image_size"):
        if key in facts.config:
            assert config[key] == facts.config[key], key
    llm, vision = config["llm_config"], config["vision_config"]
    assert llm["architectures"] == facts.llm["architectures"]
    assert llm["num_attention_heads"] == facts.llm["num_attention_heads"]
    assert llm["num_key_value_heads"] == facts.llm["num_key_value_heads"]
    assert vision["num_attention_heads"] == facts.vision["num_attention_heads"]
    assert vision["qk_normalization"] == facts.vision["qk_normalization"]
    assert vision["norm_type"] == facts.vision["norm_type"]
    dims = tiny_dimensions(facts)
    assert llm["hidden_size"] == dims.text_hidden <= facts.llm["hidden_size"]
    assert llm["num_hidden_layers"] == 2 < facts.llm.get("num_hidden_layers", 24)
    tensors = weight_names(out)
    quant = facts.quantization
    if quant and quant["quant_method"] == "awq":
        # AWQ: in llm_config as LMDeploy writes it; decoder Linear layers packed, the rest fp16.
        assert llm["quantization_config"]["group_size"] == quant["group_size"] and "quantization_config" not in config
        qweights = [n for n in tensors if n.endswith(".qweight")]
        assert qweights and all(n.startswith("language_model.model.layers.") for n in qweights)
        for name in qweights:
            stem_name = name.removesuffix(".qweight")
            (dtype, (rows, cols)) = tensors[name]
            assert dtype in ("I32", "int32")
            assert tensors[stem_name + ".scales"][1] == [rows // quant["group_size"], cols * 8]
            assert tensors[stem_name + ".qzeros"][1] == [rows // quant["group_size"], cols]
            assert stem_name + ".weight" not in tensors
        head = "language_model.output.weight" if facts.backbone == "internlm2" else "language_model.lm_head.weight"
        assert tensors[head][0] in ("F16", "float16")
    else:
        assert not [n for n in tensors if n.endswith(".qweight")]
