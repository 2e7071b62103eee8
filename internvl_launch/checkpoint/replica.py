"""Replicas of the repositories OpenGVLab publishes: their structure, tiny dimensions.

Every spec of the registry points at a real hub repository. A replica is a
small directory with that repository's structure - the same file names and
formats (safetensors or pickle, one file or shards with an index, the
remote-code `.py` files beside the weights), a `config.json` with the real keys
and values (architectures, template, pixel-shuffle version, tile limit,
attention and key/value head counts, rope settings, the vision tower's kind,
AWQ's `quantization_config` where the real one has it), the tokenizer files of
the real kind (a sentencepiece model for InternLM2, `vocab.json` and
`merges.txt` for Qwen2, ...) and AWQ tensors packed as the real ones are.
Only the sizes shrink: two layers each, narrow heads, a few hundred tokens of
vocabulary - so that the whole flow (download, plan, convert, load, chat)
runs on a CPU in seconds.

The facts come from `replica_repos.yaml` beside this file; each fact there
names its public source. The `.py` files are placeholders (one comment line):
a replica must show that they are never needed, not reproduce them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from internvl_launch.checkpoint.tiny_original import (
    TinyOriginalConfig,
    _value,
    original_config,
    tensor_shapes,
)

#: Bump when generated replicas change: it moves their cache key.
REPLICA_VERSION = 2
FACTS_FILE = Path(__file__).with_name("replica_repos.yaml")

#: Tiny widths: the head counts stay real, each head is narrow. The language
#: model's head width is one vLLM's CPU attention supports (32 at least) and a
#: multiple of 8, so AWQ's packed columns stay inside one head, with a hidden
#: size that AWQ's 128-wide groups divide.
VISION_HEAD_DIM = 4
TEXT_INTERMEDIATE = 256
VISION_INTERMEDIATE = 128

PLACEHOLDER = "# Replica of a file of the published repository; its code is not reproduced and never runs.\n"


@dataclass(frozen=True)
class RepoFacts:
    """What is known about one published repository (see replica_repos.yaml)."""

    repo_id: str
    backbone: str  # qwen2 | internlm2 | llama | phi3
    vision_style: str  # 300m | 6b
    weights: str  # safetensors | pickle
    shards: int
    tokenizer: str  # bpe-vocab-merges | bpe-tokenizer-json | internlm2-sentencepiece | llama-sentencepiece
    code_files: tuple[str, ...]
    config: dict[str, Any]
    llm: dict[str, Any]
    vision: dict[str, Any]
    quantization: dict[str, Any] | None = None
    extra_files: tuple[str, ...] = ()
    #: `native` for OpenGVLab's -hf/-HF twins (InternVLForConditionalGeneration).
    layout: str = "original"
    sources: dict[str, str] = field(default_factory=dict)


@cache
def load_facts(path: str | None = None) -> dict[str, RepoFacts]:
    """Every repository's facts, keyed by its Hugging Face id. Entries may
    inherit another's facts with `like: <repo id>` and override fields."""
    import yaml

    raw = yaml.safe_load(Path(path or FACTS_FILE).read_text(encoding="utf-8"))
    repos = {k: v for k, v in raw.items() if not k.startswith("x-")}

    def resolved(repo_id: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        entry = dict(repos[repo_id])
        parent = entry.pop("like", None)
        if parent is None:
            return entry
        if parent in seen:
            raise ValueError(f"replica facts: {repo_id} inherits from itself through {parent}")
        base = resolved(parent, (*seen, repo_id))
        merged = {**base, **entry}
        for key in ("config", "llm", "vision", "sources"):
            if key in entry and key in base:
                merged[key] = {**base[key], **entry[key]}
        return merged

    out = {}
    for repo_id in repos:
        e = resolved(repo_id)
        out[repo_id] = RepoFacts(
            repo_id=repo_id,
            backbone=e["backbone"],
            vision_style=e["vision_style"],
            weights=e["weights"]["format"],
            shards=int(e["weights"].get("shards", 1)),
            tokenizer=e["tokenizer"]["kind"],
            code_files=tuple(e.get("code_files", ())),
            config=dict(e.get("config", {})),
            llm=dict(e.get("llm", {})),
            vision=dict(e.get("vision", {})),
            quantization=e.get("quantization"),
            extra_files=tuple(e["tokenizer"].get("files", ())) + tuple(e.get("extra_files", ())),
            layout=str(e.get("layout", "original")),
            sources=dict(e.get("sources", {})),
        )
    return out


#: Head widths vLLM's CPU attention accepts (vllm/v1/attention/backends/cpu_attn.py, 0.32).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128)


def text_head_dim(heads: int) -> int:
    """The narrowest head width vLLM's CPU attention accepts for which `heads`
    heads make a hidden size that AWQ's 128-wide groups divide."""
    return next(width for width in VLLM_CPU_HEAD_DIMS if (heads * width) % 128 == 0)


def tiny_dimensions(facts: RepoFacts) -> TinyOriginalConfig:
    """The replica's dimensions: the real head counts, narrow heads, two layers."""
    heads = int(facts.llm["num_attention_heads"])
    kv = int(facts.llm.get("num_key_value_heads") or heads)
    vheads = int(facts.vision["num_attention_heads"])
    return TinyOriginalConfig(
        backbone=facts.backbone,
        vision_style=facts.vision_style,
        vision_hidden=vheads * VISION_HEAD_DIM,
        vision_layers=2,
        vision_heads=vheads,
        vision_intermediate=VISION_INTERMEDIATE,
        text_hidden=heads * text_head_dim(heads),
        text_layers=2,
        text_heads=heads,
        text_kv_heads=kv,
        text_intermediate=TEXT_INTERMEDIATE,
        ps_version=str(facts.config.get("ps_version", "v1")),
        max_dynamic_patch=int(facts.config.get("max_dynamic_patch", 6)),
    )


# --- tokenizers -------------------------------------------------------------------------


def _write_tokenizer(facts: RepoFacts, out: Path, template: str) -> tuple[int, int, int]:
    """The tokenizer files of the real kind; returns (vocabulary size, eos id, pad id)."""
    if facts.tokenizer in ("internlm2-sentencepiece", "llama-sentencepiece"):
        return _sentencepiece_tokenizer(facts, out, template)
    from internvl_launch.checkpoint.tiny import TinyConfig, train_tokenizer

    tokenizer = train_tokenizer(TinyConfig(template=template))
    tokenizer.chat_template = None
    if facts.backbone in ("qwen3", "qwen3_moe"):
        # Qwen3's vocabulary has the thinking tags as plain (not special) tokens.
        tokenizer.add_tokens(["<think>", "</think>"], special_tokens=False)
    if template == "internvl3_5_gpt_oss":
        # GPT-OSS's harmony markers are special tokens of its tokenizer; replies end with <|return|>.
        harmony = ["<|start|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"]
        tokenizer.add_tokens(harmony, special_tokens=True)
        tokenizer.eos_token = "<|return|>"
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if facts.tokenizer == "bpe-vocab-merges" or "vocab.json" in facts.extra_files:
        # Qwen2's slow files, beside tokenizer.json or (bpe-vocab-merges) instead of it.
        tokenizer.backend_tokenizer.model.save(str(out))
        vocab = tokenizer.get_vocab()
        added = {t: vocab[t] for t in (*tokenizer.all_special_tokens, "<think>", "</think>") if t in vocab}
        (out / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    if facts.tokenizer == "bpe-vocab-merges":
        (out / "tokenizer.json").unlink()
        config["tokenizer_class"] = "Qwen2Tokenizer"
    else:
        config["tokenizer_class"] = "Qwen2Tokenizer" if facts.backbone == "qwen2" else "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return len(tokenizer), int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)


def _sentencepiece_tokenizer(facts: RepoFacts, out: Path, template: str) -> tuple[int, int, int]:
    from internvl_launch.checkpoint.tiny_original import train_internlm2_tokenizer

    train_internlm2_tokenizer(out, add_dummy_prefix=facts.tokenizer == "llama-sentencepiece")
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    added = json.loads((out / "added_tokens.json").read_text())
    if facts.tokenizer == "llama-sentencepiece":
        # Phi-3 and Yi: Llama's sentencepiece tokenizer, no remote tokenizer code.
        config.pop("auto_map", None)
        config["tokenizer_class"] = "LlamaTokenizer"
        if template == "phi3-chat":
            size = max(added.values()) + 1
            for i, piece in enumerate(("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")):
                if piece not in added:
                    added[piece] = size + i
                    config["added_tokens_decoder"][str(size + i)] = {
                        "content": piece,
                        "lstrip": False,
                        "rstrip": piece != "<|endoftext|>",
                        "normalized": False,
                        "single_word": False,
                        "special": piece == "<|endoftext|>",
                    }
        (out / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).get_piece_size()
    vocab = max(pieces, max(added.values()) + 1)
    end = "<|end|>" if template == "phi3-chat" else "<|im_end|>"
    eos = added.get(end)
    if eos is None:
        eos = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).piece_to_id(end)
    return vocab, int(eos), 2  # </s> pads, as InternLM2's tokenizer config says


# --- weights ----------------------------------------------------------------------------


def _tensors(facts: RepoFacts, dims: TinyOriginalConfig, vocab: int, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, str(facts.config.get("torch_dtype", "bfloat16")))
    shapes = tensor_shapes(dims, vocab)
    head = "language_model.lm_head.weight"
    if facts.llm.get("tie_word_embeddings"):
        shapes.pop(head, None)  # a tied head is stored once, as the embeddings
    elif head not in shapes and "language_model.output.weight" not in shapes:
        shapes[head] = (vocab, dims.text_hidden)  # an untied head (Qwen3-8B and larger)
    tensors = {name: _value(name, shape, gen) for name, shape in shapes.items()}
    if facts.quantization:
        from internvl_launch.checkpoint.awq import pack_awq

        group = int(facts.quantization.get("group_size", 128))
        packed: dict[str, Any] = {}
        for name, tensor in tensors.items():
            if _awq_target(name):
                qweight, qzeros, scales = pack_awq(tensor, group)
                stem = name[: -len(".weight")]
                packed[stem + ".qweight"] = qweight
                packed[stem + ".qzeros"] = qzeros
                packed[stem + ".scales"] = scales.to(torch.float16)
            else:
                packed[name] = tensor.to(torch.float16)
        return packed
    return {name: tensor.to(dtype) for name, tensor in tensors.items()}


def _awq_target(name: str) -> bool:
    """The Linear weights LMDeploy's auto_awq quantizes: those inside the
    language model's decoder layers (not embeddings, norms, the output head,
    the vision tower or the projector)."""
    return name.startswith("language_model.model.layers.") and name.endswith(".weight") and "norm" not in name


def _write_weights(facts: RepoFacts, tensors: dict[str, Any], out: Path) -> list[str]:
    import torch
    from safetensors.torch import save_file

    names = list(tensors)
    shards = max(1, min(facts.shards, len(names)))
    bounds = [len(names) * i // shards for i in range(shards + 1)]
    groups = [names[bounds[i] : bounds[i + 1]] for i in range(shards)]
    pickle = facts.weights == "pickle"
    stem, ext = ("pytorch_model", "bin") if pickle else ("model", "safetensors")
    written: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, 1):
        file = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i:05d}-of-{shards:05d}.{ext}"
        part = {k: tensors[k].contiguous() for k in group}
        if pickle:
            torch.save(part, out / file)
        else:
            save_file(part, str(out / file), metadata={"format": "pt"})
        written.append(file)
        weight_map.update(dict.fromkeys(group, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    if shards > 1:
        index = f"{stem}.{ext}.index.json"
        (out / index).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
        written.append(index)
    return written


# --- config -----------------------------------------------------------------------------


def _config(facts: RepoFacts, dims: TinyOriginalConfig, vocab: int, eos: int, pad: int) -> dict[str, Any]:
    config = original_config(dims, vocab, eos, pad)
    for key in ("ps_version", "max_dynamic_patch"):
        config.pop(key, None)  # the real file says whether it has them
    config.update({k: v for k, v in facts.config.items()})
    llm = config["llm_config"]
    head_dim = dims.text_hidden // dims.text_heads
    # Widths, layer counts and expert counts are the generator's; everything else is the real file's.
    shrunk = {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "vocab_size",
        "head_dim",
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "experts_per_token",
        "moe_intermediate_size",
        "layer_types",
        "max_window_layers",
    }
    for key, value in facts.llm.items():
        if key not in shrunk:
            llm[key] = value
    llm["eos_token_id"], llm["pad_token_id"] = eos, pad
    scaling = llm.get("rope_scaling")
    if isinstance(scaling, dict):
        # Per-frequency factors (Phi-3's longrope) have one entry per half head width.
        for key in ("long_factor", "short_factor"):
            if isinstance(scaling.get(key), list):
                scaling[key] = scaling[key][: head_dim // 2]
    if "head_dim" in facts.llm:
        llm["head_dim"] = head_dim
    vision = config["vision_config"]
    for key, value in facts.vision.items():
        if key not in {"hidden_size", "intermediate_size", "num_hidden_layers"}:
            vision[key] = value
    if facts.quantization:
        quant = {k: v for k, v in facts.quantization.items() if k != "where"}
        if facts.quantization.get("where", "llm_config") == "llm_config":
            llm["quantization_config"] = quant
        else:
            config["quantization_config"] = quant
    return config


# --- the replica ------------------------------------------------------------------------


def generate_replica(repo_id: str, directory: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write the replica of `repo_id` (a Hugging Face id from the facts file) to `directory`."""
    facts = load_facts()[repo_id]
    if facts.quantization and facts.quantization.get("quant_method") != "awq":
        raise ValueError(
            f"{repo_id} is saved already quantized by {facts.quantization.get('quant_method')}, which no engine "
            "here reads (the plan refuses it before any download); its replica is not generated."
        )
    out = Path(directory)
    if facts.layout == "native":
        return _native_replica(facts, out, seed)
    return _write_original(facts, out, seed)


def _write_original(facts: RepoFacts, out: Path, seed: int) -> Path:
    from internvl_launch.prompt.templates import TEMPLATES

    repo_id = facts.repo_id
    out.mkdir(parents=True, exist_ok=True)
    dims = tiny_dimensions(facts)
    template = str(facts.config.get("template") or ("phi3-chat" if facts.backbone == "phi3" else "internlm2-chat"))
    if template not in TEMPLATES:
        raise ValueError(f"{repo_id}: unknown template {template!r}")
    vocab, eos, pad = _write_tokenizer(facts, out, template)
    config = _config(facts, dims, vocab, eos, pad)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    _write_weights(facts, _tensors(facts, dims, vocab, seed), out)
    generation: dict[str, Any] = {"eos_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in facts.code_files:
        (out / name).write_text(PLACEHOLDER)
    for name in facts.extra_files:
        if not (out / name).exists():
            (out / name).write_text("{}\n" if name.endswith(".json") else "")
    return out


def _native_replica(facts: RepoFacts, out: Path, seed: int) -> Path:
    """A native-layout twin: the original replica converted to Transformers'
    layout (OpenGVLab made its -hf repositories with Transformers' own
    converter; the structure that matters to the engines - architecture,
    config, tensor names, processor files - is the same)."""
    import tempfile
    from dataclasses import replace

    from internvl_launch.checkpoint.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        original = replace(facts, layout="original", repo_id=facts.repo_id + " (original)")
        source = Path(tmp) / "original"
        _write_original(original, source, seed)
        convert(source, out, verify=False, overwrite=True)
    (out / "internvl_launch_conversion.json").unlink(missing_ok=True)
    return out


def replica_key(repo_id: str) -> str:
    import hashlib

    facts = load_facts()[repo_id]
    blob = json.dumps({"v": REPLICA_VERSION, "facts": facts.__dict__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_replica(repo_id: str, root: Path) -> Path:
    """The replica of `repo_id` under `root`, generated on first use (written
    beside and renamed into place, so a half-written one never looks complete)."""
    target = root / f"{repo_id.replace('/', '--')}-{replica_key(repo_id)}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate_replica(repo_id, tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
