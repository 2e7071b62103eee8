"""Tiny random InternVL checkpoints, generated on this machine.

The built-in `internvl-tiny` model and the test bed: a real
`InternVLForConditionalGeneration` (InternViT-style vision tower at 448 px with
14 px patches, so the real tiling and the real 256 tokens per tile apply; a
pixel-shuffle projector; a small language model) with random weights, a
byte-level BPE tokenizer trained here on a fixed corpus with every special
token the templates use, a chat template, and a generation config whose end
token is the template's.

Generation is deterministic: the same arguments give the same files, byte for
byte, so a cached copy is reused by its content key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from internvl_launch.paths import cache_dir

#: Bump when the generated files change: it moves the cache key.
GENERATOR_VERSION = 3

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<video>",
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A red panda sits on a branch and eats bamboo.
Describe the image in detail. What is in the picture? Please describe the image shortly.
Image-1: Image-2: Frame1: Frame2: Frame3: Frame4: Frame5: Frame6: Frame7: Frame8:
The cat is sleeping on the sofa. Two dogs play in the park under a blue sky.
Hello, who are you? I am an AI assistant. Can you tell me a story? Once upon a time there was a small robot.
What are the similarities and differences between these two images? Both show animals outdoors.
system user assistant You are a helpful assistant. Answer briefly. Say more.
0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2024 2025 2026, . ; : ! ? ( ) [ ] { } < > / \\ - _ = + * & % $ # @ " '
你好 你是谁 图片 描述 书生 万象 上海人工智能实验室 这是一只小熊猫
"""


@dataclass(frozen=True)
class TinyConfig:
    """Dimensions of a tiny checkpoint. Every quantizable Linear has at least
    64 input features, so bitsandbytes 4-bit (block size 64) works on it."""

    backbone: str = "qwen2"  # qwen2 | llama (InternLM2 converts to llama) | phi3
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
    template: str = "internvl2_5"

    def key(self) -> str:
        blob = json.dumps({"v": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_tokenizer(config: TinyConfig) -> Any:
    """A byte-level BPE tokenizer trained on a fixed corpus, deterministic,
    with the templates' special tokens as single special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_target,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    end = "<|end|>" if config.template == "phi3-chat" else "<|im_end|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=end,
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (end, "<|endoftext|>")],
        chat_template=chat_template(config.template, TINY_SYSTEM_MESSAGE),
        model_max_length=8192,
    )


#: The built-in model's default system message (its spec says the same).
TINY_SYSTEM_MESSAGE = "You are a tiny test model with random weights."


def chat_template(template: str, system_message: str) -> str:
    """A Jinja chat template writing the same prompt as `internvl_launch.prompt`
    for text, images and video (an image part becomes `<IMG_CONTEXT>`, with
    `Image-N: ` before it when the conversation has several; a video part
    becomes `<video>`; processors expand both), so that other engines reading
    the checkpoint agree."""
    if template == "phi3-chat":
        sys_open, user, assistant, sep = "<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>"
    elif template == "internvl3_5_gpt_oss":
        sys_open, user = "<|start|>system<|message|>", "<|start|>user<|message|>"
        assistant, sep = "<|start|>assistant", "<|end|>"
    else:
        sys_open, user, assistant = "<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"
        sep = "<|im_end|>\n" if template == "internvl2_5" else "<|im_end|>"
    return (
        "{%- set sep = " + json.dumps(sep) + " -%}"
        "{%- set ns = namespace(images=0, seen=0) -%}"
        "{%- for m in messages if m['content'] is not string -%}"
        "{%- for p in m['content'] if p['type'] in ['image', 'image_url'] -%}{%- set ns.images = ns.images + 1 -%}"
        "{%- endfor -%}{%- endfor -%}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{{ " + json.dumps(sys_open) + " }}{{ messages[0]['content'] if messages[0]['content'] is string "
        "else messages[0]['content'][0]['text'] }}{{ sep }}"
        "{%- set messages = messages[1:] -%}"
        "{%- else -%}{{ " + json.dumps(sys_open + system_message) + " }}{{ sep }}"
        "{%- endif -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{ " + json.dumps(user) + " }}"
        "{%- else -%}{{ " + json.dumps(assistant) + " }}{%- endif -%}"
        "{%- if m['content'] is string -%}{{ m['content'] }}"
        "{%- else -%}"
        "{%- for p in m['content'] if p['type'] in ['image', 'image_url', 'video', 'video_url'] -%}"
        "{%- if p['type'] in ['video', 'video_url'] -%}{{ '<video>\\n' }}"
        "{%- elif ns.images > 1 -%}{%- set ns.seen = ns.seen + 1 -%}{{ 'Image-' ~ ns.seen ~ ': <IMG_CONTEXT>\\n' }}"
        "{%- else -%}{{ '<IMG_CONTEXT>\\n' }}{%- endif -%}{%- endfor -%}"
        "{%- for p in m['content'] if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}"
        "{%- endif -%}{{ sep }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + json.dumps(assistant) + " }}{%- endif -%}"
    )


def model_config(config: TinyConfig, tokenizer: Any) -> Any:
    """The native `InternVLConfig` for these dimensions and this tokenizer."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Phi3Config, Qwen2Config

    vocab = len(tokenizer)
    text_kwargs: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": config.text_hidden,
        "num_hidden_layers": config.text_layers,
        "num_attention_heads": config.text_heads,
        "num_key_value_heads": config.text_kv_heads,
        "intermediate_size": config.text_intermediate,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "phi3": Phi3Config}[config.backbone]
    text = text_cls(**text_kwargs)
    vision = InternVLVisionConfig(
        hidden_size=config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        intermediate_size=config.vision_intermediate,
        image_size=[448, 448],
        patch_size=[14, 14],
        attention_bias=True,
        use_mean_pooling=False,
    )
    return InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=256,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def generate_tiny(directory: str | os.PathLike[str], config: TinyConfig = TinyConfig()) -> Path:
    """Write a tiny native-layout checkpoint to `directory` (created; must not
    exist or be empty). Returns the directory."""
    import torch
    from transformers import GenerationConfig, InternVLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(config)
    cfg = model_config(config, tokenizer)
    cfg.architectures = ["InternVLForConditionalGeneration"]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(config.seed)
        model = InternVLForConditionalGeneration(cfg).eval()
    finally:
        torch.random.set_rng_state(state)
    end_id = tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_processor_files(out)
    (out / "internvl_launch.json").write_text(
        json.dumps({"generator": GENERATOR_VERSION, "config": asdict(config)}, indent=2, sort_keys=True)
    )
    return out


#: The tokens Transformers' InternVL processor looks up by name on the tokenizer.
NAMED_IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def write_processor_files(out: Path, max_tiles: int = 12) -> None:
    """The processor files of a native InternVL checkpoint, so that engines
    that preprocess through Transformers' `InternVLProcessor` (vLLM) load it:
    the named image tokens on the tokenizer, the image processor's settings
    (448-pixel tiles, ImageNet mean and std, bicubic, up to `max_tiles`
    tiles plus the thumbnail) and the 256 tokens per tile."""
    path = out / "tokenizer_config.json"
    tok_cfg = json.loads(path.read_text())
    tok_cfg.update(NAMED_IMAGE_TOKENS)
    path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    image = {
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": True,
        "min_patches": 1,
        "max_patches": max_tiles,
        "size": {"height": 448, "width": 448},
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    processor = {"processor_class": "InternVLProcessor", "image_seq_length": 256}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def tiny_checkpoint(config: TinyConfig = TinyConfig()) -> Path:
    """The cached tiny checkpoint for `config`, generated on first use.

    Written to a temporary directory next to the cache entry and renamed into
    place, so an interrupted generation never leaves a half-written model that
    looks complete."""
    root = cache_dir() / "models" / "internvl-tiny"
    target = root / config.key()
    if (target / "internvl_launch.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        generate_tiny(tmp, config)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; theirs is identical
            if not (target / "internvl_launch.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
