"""A `tokenizer.json` for checkpoints that ship only a sentencepiece model.

InternLM2-based InternVL checkpoints (InternVL2-2B/8B/26B, 2.5-2B/8B/26B,
InternVL-Chat-V1-5, InternVL3-9B) ship `tokenizer.model` with Python code for
a slow tokenizer. This builds the equivalent fast tokenizer from the
sentencepiece model's own settings, so that no checkpoint code runs:

* the BPE vocabulary and merges, with byte fallback;
* each stretch of text between added tokens normalised as sentencepiece does:
  spaces become `▁`, and a `▁` is prepended when the model's
  `add_dummy_prefix` is set (the slow tokenizer encodes each stretch
  separately, so the prefix applies to each);
* `<s>` before every sequence (`add_bos_token`), no `</s>` after;
* the added tokens of `tokenizer_config.json` and `added_tokens.json` (chat
  markers, InternVL's image tokens), never split or normalised.

Reading a sentencepiece model needs the `sentencepiece` and `protobuf` packages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from internvl_launch.errors import CheckpointError

_BPE = 2


def _proto(model_file: Path) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:
        raise CheckpointError(
            f"{model_file} is a sentencepiece model, and reading one needs the sentencepiece and protobuf packages.",
            hint="pip install sentencepiece protobuf (or 'internvl-launch[transformers]').",
        ) from err
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as err:
        raise CheckpointError(f"{model_file} is not a readable sentencepiece model ({err}).") from err
    return proto


def _added_tokens(directory: Path) -> dict[int, dict[str, Any]]:
    """Added tokens by id, from tokenizer_config.json and added_tokens.json."""
    added: dict[int, dict[str, Any]] = {}
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        for index, token in (json.loads(config_file.read_text()).get("added_tokens_decoder") or {}).items():
            added[int(index)] = {"content": token["content"], "special": bool(token.get("special", True))}
    extra = directory / "added_tokens.json"
    if extra.is_file():
        for content, index in json.loads(extra.read_text()).items():
            added.setdefault(int(index), {"content": content, "special": True})
    return added


def build_tokenizer_json(directory: Path) -> Path:
    """Write `directory/tokenizer.json` from `directory/tokenizer.model` and
    the directory's added tokens; returns its path."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    model_file = directory / "tokenizer.model"
    proto = _proto(model_file)
    if proto.trainer_spec.model_type != _BPE:
        raise CheckpointError(
            f"{model_file} is a sentencepiece model of type {proto.trainer_spec.model_type}; "
            "InternVL's sentencepiece tokenizers are BPE (type 2).",
        )
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _score) in enumerate(pieces)}
    merges = generate_merges(vocab, dict(pieces))
    unk = pieces[proto.trainer_spec.unk_id][0]
    tokenizer = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    steps = [normalizers.Prepend("▁")] if prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    bos = pieces[proto.trainer_spec.bos_id][0]
    bos_id = proto.trainer_spec.bos_id
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    specials = [pieces[i][0] for i in (proto.trainer_spec.unk_id, bos_id, proto.trainer_spec.eos_id) if i >= 0]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    added = _added_tokens(directory)
    for index in sorted(added):
        token = added[index]
        if index < len(pieces) and pieces[index][0] != token["content"]:
            raise CheckpointError(
                f"Added token {token['content']!r} claims id {index}, which the sentencepiece model gives to "
                f"{pieces[index][0]!r}.",
            )
        if index >= len(pieces) and index != tokenizer.get_vocab_size(with_added_tokens=True):
            raise CheckpointError(f"Added token {token['content']!r} has id {index}; ids must follow the vocabulary.")
        tokenizer.add_special_tokens(
            [AddedToken(token["content"], normalized=False, special=token["special"])]
        ) if token["special"] else tokenizer.add_tokens([AddedToken(token["content"], normalized=False)])
    out = directory / "tokenizer.json"
    tokenizer.save(str(out))
    return out
