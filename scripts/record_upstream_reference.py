"""Record the fidelity references with OpenGVLab's original code (run outside
this project's environment; nothing of upstream's is in this repository).

    # a separate virtual environment:
    #   pip install torch==2.13.0 transformers==4.37.2 einops sentencepiece safetensors numpy 'accelerate<1' peft==0.10.0
    # a checkout of OpenGVLab/InternVL, and a stub package providing an identity
    # timm.models.layers.DropPath on PYTHONPATH (timm itself needs torchvision)
    PYTHONPATH=STUBS:THIS_REPO python scripts/record_upstream_reference.py \\
        --internvl-src INTERNVL/internvl_chat --out OUT_DIR

Writes OUT_DIR/upstream_logits.json (logits of InternVLChatModel on the tiny
original-layout checkpoints: one per backbone with pixel shuffle v2, and
InternLM2 with pixel shuffle v1) and
OUT_DIR/internlm2_tokenizer_reference.json (InternLM2Tokenizer on the tiny
sentencepiece models in tests/data/internlm2_tokenizer). The tests compare
the converted checkpoints and tokenizers against these files.

InternVL3.5's backbones (Qwen3, Qwen3-MoE, GPT-OSS) need the code and the
Transformers version of InternVL3.5's training folder, so they are recorded
in a second environment and merged into the same file:

    #   pip install torch==2.13.0 transformers==4.55.0 einops sentencepiece safetensors numpy accelerate==1.9.0
    # (4.55.0 is what internvl_chat_gpt_oss/requirements.txt pins); the stub
    # package must provide timm.layers.DropPath, which that folder imports
    PYTHONPATH=STUBS:THIS_REPO python scripts/record_upstream_reference.py --internvl3-5 \
        --internvl-src INTERNVL/internvl_chat_gpt_oss --out OUT_DIR --merge-into tests/data/upstream_logits.json

Each such entry records its environment under "recorded_with"; entries
already in the file are kept as they are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

#: The recorded checkpoints: their name in upstream_logits.json and the
#: TinyOriginalConfig settings they are generated with.
CASES: dict[str, dict] = {
    "qwen2": {"backbone": "qwen2", "vision_style": "300m"},
    "internlm2": {"backbone": "internlm2", "vision_style": "300m"},
    "llama": {"backbone": "llama", "vision_style": "6b"},
    "phi3": {"backbone": "phi3", "vision_style": "300m"},
    # InternVL 1.5's pixel shuffle (Mini-InternVL-Chat-2B-V1-5: InternLM2, InternViT-300M).
    "internlm2_ps_v1": {"backbone": "internlm2", "vision_style": "300m", "ps_version": "v1"},
}
#: InternVL3.5's language models (InternVL3.5-1B..38B: Qwen3; 30B-A3B and
#: 241B-A28B: Qwen3-MoE; GPT-OSS-20B-A4B-Preview: GPT-OSS).
CASES_3_5: dict[str, dict] = {
    "qwen3": {"backbone": "qwen3", "vision_style": "300m"},
    "qwen3_moe": {"backbone": "qwen3_moe", "vision_style": "300m"},
    "gpt_oss": {"backbone": "gpt_oss", "vision_style": "300m"},
}
TEXTS = [
    "Hello world", " leading space", "trailing space ", "a  b\n\nc", "你好，世界 123", "3.14 2026",
    "<|im_start|>user\nhi<|im_end|>",
    "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe the image.",
    "<|im_start|>system\n你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型<|im_end|><|im_start|>user\n"
    "<img><IMG_CONTEXT></img>\nWhat is in the picture?<|im_end|><|im_start|>assistant\n",
    "emoji ☃ 🐼 byte fallback", "tab\tand\r\ncrlf", "",
    "<quad>(1,2)</quad><ref>cat</ref><box>[[1,2,3,4]]</box>",
    "Frame1: <img></img>\nFrame2: ", "  two leading", "\nnewline first",
]  # fmt: skip


def logits(out: Path, cases: dict[str, dict]) -> dict:
    import torch
    import transformers
    from internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel
    from safetensors.torch import load_file

    from internvl_launch.checkpoint.tiny_original import TinyOriginalConfig, fidelity_inputs, generate_tiny_original

    result: dict = {"transformers": transformers.__version__, "torch": torch.__version__, "models": {}}
    for name, settings in cases.items():
        config = TinyOriginalConfig(**settings)
        path = generate_tiny_original(out / "checkpoints" / name, config)
        cfg = InternVLChatConfig.from_pretrained(path)
        cfg.llm_config.attn_implementation = cfg.llm_config._attn_implementation = "eager"
        model = InternVLChatModel.from_pretrained(path, config=cfg, torch_dtype=torch.float32, use_flash_attn=False)
        model.eval()
        if any(p.dtype != torch.float32 for p in model.mlp1.parameters()):
            # InternVL3.5's InternVLChatModel.__init__ casts mlp1 to bfloat16,
            # so the weights were loaded rounded: back to float32, reloaded.
            state = load_file(path / "model.safetensors")
            model.mlp1.float().load_state_dict(
                {k[len("mlp1.") :]: v for k, v in state.items() if k.startswith("mlp1.")}
            )
        loaded = model.state_dict()
        differ = [k for k, v in load_file(path / "model.safetensors").items() if not torch.equal(loaded[k], v)]
        assert not differ, f"{name}: parameters differ from the file: {differ[:3]}"
        added = {t["content"]: t["id"] for t in json.loads((path / "tokenizer.json").read_text())["added_tokens"]}
        ctx, start, end = (added[t] for t in ("<IMG_CONTEXT>", "<img>", "</img>"))
        model.img_context_token_id = ctx
        ids, pixels = fidelity_inputs(ctx, start, end)
        with torch.no_grad():
            flags = torch.ones(pixels.shape[0], dtype=torch.long)
            values = model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), image_flags=flags)
            values = values.logits[0]
        where = (ids[0] == ctx).nonzero()
        positions: tuple[int, ...] = (int(where[0]), int(where[-1]), ids.shape[1] - 1)
        if config.ps_version == "v1":
            # The first image token is grid cell (0, 0) in either order; the
            # second is (0, 1) in v2 and (1, 0) in v1: the first row that differs.
            positions = (positions[0], positions[0] + 1, *positions[1:])
        result["models"][name] = {
            "generator_config": asdict(config),
            "model_sha256": hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest(),
            "positions": {str(p): [round(float(v), 6) for v in values[p]] for p in positions},
            "sum": float(values.double().sum()),
            "abs_sum": float(values.double().abs().sum()),
            "greedy_last": int(values[-1].argmax()),
        }
    return result


def write_json(path: Path, data: dict) -> None:
    """Indented JSON with each list of numbers on one line (a logit row per line)."""
    text = json.dumps(data, ensure_ascii=False, indent=1)
    number = r"-?[0-9][0-9.eE+-]*"
    rows = re.compile(rf"\[\n\s*({number}(?:,\n\s*{number})*)\n\s*\]")
    text = rows.sub(lambda m: "[" + re.sub(r",\n\s*", ",", m.group(1)) + "]", text)
    path.write_text(text + "\n")


def merge(recorded: dict, into: Path, source: str) -> dict:
    """`into`'s entries, unchanged, plus the newly recorded ones, each with
    the environment it was recorded in."""
    data = json.loads(into.read_text())
    for name, entry in recorded["models"].items():
        environment = {"transformers": recorded["transformers"], "torch": recorded["torch"], "source": source}
        data["models"][name] = {"recorded_with": environment, **entry}
    return data


def tokenizer(out: Path) -> None:
    import transformers
    from internvl.model.internlm2.tokenization_internlm2 import InternLM2Tokenizer

    data = Path(__file__).resolve().parent.parent / "tests" / "data" / "internlm2_tokenizer"
    result: dict = {"transformers": transformers.__version__, "texts": TEXTS, "tokenizers": {}}
    for name in ("dummy_prefix", "no_dummy_prefix"):
        tok = InternLM2Tokenizer.from_pretrained(data / name)
        encoded = [tok(t).input_ids for t in TEXTS]
        result["tokenizers"][name] = {
            "input_ids": encoded,
            "decoded": [tok.decode(ids[1:]) for ids in encoded],
            "decoded_skip_special": [tok.decode(ids, skip_special_tokens=True) for ids in encoded],
            "len": len(tok),
        }
    (out / "internlm2_tokenizer_reference.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--internvl-src",
        required=True,
        help="OpenGVLab/InternVL's internvl_chat directory (internvl_chat_gpt_oss with --internvl3-5)",
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--internvl3-5", action="store_true", help="record InternVL3.5's backbones only")
    parser.add_argument("--merge-into", type=Path, help="with --internvl3-5: add the entries to this JSON file")
    parser.add_argument("--source", default="OpenGVLab/InternVL 2410d1d internvl_chat_gpt_oss/internvl/model")
    args = parser.parse_args()
    sys.path.insert(0, args.internvl_src)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.internvl3_5:
        recorded = logits(args.out, CASES_3_5)
        write_json(args.out / "upstream_logits_internvl3_5.json", recorded)
        if args.merge_into:
            write_json(args.merge_into, merge(recorded, args.merge_into, args.source))
        return 0
    write_json(args.out / "upstream_logits.json", logits(args.out, CASES))
    tokenizer(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
