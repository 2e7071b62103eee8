"""What the user asked for, parsed once, tolerantly.

`LaunchRequest` is the typed value that CLI flags, launch files and the Python
API all produce. The parsers here accept the spellings people type
(`8`, `8b`, `8B`; `int4`, `Int4`; `4bit`, `4-bit`) and a one-string model
reference in the style `internvl2:8b-awq`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

Engine = Literal["vllm", "transformers"]
Device = Literal["auto", "cuda", "cpu"]
HubName = Literal["huggingface", "modelscope"]

ENGINES: tuple[Engine, ...] = ("vllm", "transformers")
FORMATS = ("pytorch", "awq")
HUBS: tuple[HubName, ...] = ("huggingface", "modelscope")


class RequestError(ValueError):
    """A value in the request cannot be understood; the message says which."""


@dataclass(frozen=True)
class LaunchRequest:
    """A user's request, before the registry and the machine are consulted."""

    model_name: str
    size: float | None = None
    format: str | None = None
    quantization: str | None = None
    engine: Engine | None = None
    hub: HubName | None = None
    revision: str | None = None
    device: Device = "auto"
    gpus: int | None = None
    max_model_len: int | None = None
    memory_check: bool = True
    #: A checkpoint directory to use instead of a hub download; without a
    #: model name, the spec is read from the checkpoint itself.
    model_path: str | None = None
    #: Overrides the spec's (or the checkpoint's) conversation template.
    template: str | None = None
    #: The user allows the checkpoint's own Python code (vLLM then serves an
    #: original-layout checkpoint as it is, instead of a conversion).
    trust_remote_code: bool = False


def parse_size(text: str | float | int) -> float:
    """`8`, `8b`, `8B`, `0.5`, `0_5`, `1.8B` -> billions as a float."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:[._]\d+)?)\s*[bB]?\s*", text)
        if not m:
            raise RequestError(f"size {text!r} is not a number of billions (for example 8, 8b, 0.5)")
        value = float(m.group(1).replace("_", "."))
    if value <= 0:
        raise RequestError(f"size {text!r} must be positive")
    return value


def quantization_key(text: str) -> str:
    """Comparison key: case and separators ignored, so `4bit` == `4-bit` and
    `int4` == `Int4`."""
    key = re.sub(r"[\s_\-]", "", text.lower())
    return {"fp16": "none", "bf16": "none", "fp32": "none", "full": "none", "no": "none"}.get(key, key)


def match_quantization(text: str, available: Iterable[str]) -> str | None:
    """The spelling in `available` that `text` means, or None."""
    wanted = quantization_key(text)
    for q in available:
        if quantization_key(q) == wanted:
            return q
    return None


def parse_engine(text: str) -> Engine:
    """`vllm`/`vLLM`, `transformers`/`Transformers`/`hf` -> canonical engine name."""
    key = text.strip().lower()
    aliases: dict[str, Engine] = {"vllm": "vllm", "transformers": "transformers", "hf": "transformers"}
    if key not in aliases:
        raise RequestError(f"engine {text!r} is not one of: vllm, transformers")
    return aliases[key]


def parse_format(text: str) -> str:
    key = text.strip().lower()
    if key not in FORMATS:
        raise RequestError(f"model format {text!r} is not one of: {', '.join(FORMATS)}")
    return key


def parse_hub(text: str) -> HubName:
    key = text.strip().lower().replace("_", "").replace("-", "")
    aliases: dict[str, HubName] = {
        "huggingface": "huggingface",
        "hf": "huggingface",
        "modelscope": "modelscope",
        "ms": "modelscope",
    }
    if key not in aliases:
        raise RequestError(f"hub {text!r} is not one of: {', '.join(HUBS)}")
    return aliases[key]


def parse_model_reference(text: str) -> tuple[str, float | None, str | None, str | None]:
    """Split `family[:size[-format][-quantization]]` into its parts.

    `internvl2:8b` -> ("internvl2", 8.0, None, None);
    `internvl2:8b-awq` -> ("internvl2", 8.0, "awq", None);
    `internvl2:8b-4bit` -> ("internvl2", 8.0, None, "4bit").
    """
    name, sep, tag = text.partition(":")
    name = name.strip()
    if not name:
        raise RequestError(f"model reference {text!r} has no model name")
    if not sep:
        return name, None, None, None
    size_text, _, rest = tag.strip().partition("-")
    if not size_text:
        raise RequestError(f"model reference {text!r} has an empty tag after ':'")
    size = parse_size(size_text)
    fmt: str | None = None
    head, _, tail = rest.partition("-")
    if head.lower() in FORMATS:
        fmt, rest = head.lower(), tail
    quant = rest or None
    return name, size, fmt, quant


def merge_reference(request: LaunchRequest) -> LaunchRequest:
    """Fold a `name:tag` model reference into the request's fields. A flag that
    contradicts the tag is an error, not a silent choice."""
    if not request.model_name and request.model_path:
        return request
    name, size, fmt, quant = parse_model_reference(request.model_name)
    if name == request.model_name:
        return request
    for flag, tagged, given in (
        ("--size-in-billions", size, request.size),
        ("--model-format", fmt, request.format),
        ("--quantization", quant, request.quantization),
    ):
        if tagged is not None and given is not None:
            same = (
                float(tagged) == float(given)
                if flag == "--size-in-billions"
                else quantization_key(str(tagged)) == quantization_key(str(given))
            )
            if not same:
                raise RequestError(f"{flag} {given} contradicts the model reference {request.model_name!r}")
    return replace(
        request,
        model_name=name,
        size=request.size if request.size is not None else size,
        format=request.format or fmt,
        quantization=request.quantization or quant,
    )
