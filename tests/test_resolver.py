from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import ENVIRONMENTS, make_env

from internvl_launch.environment import Environment
from internvl_launch.errors import (
    EngineUnavailableError,
    NoMatchingSpecError,
    NotEnoughMemoryError,
    PlacementError,
    UnknownModelError,
)
from internvl_launch.registry import Family, Spec, load_registry
from internvl_launch.request import LaunchRequest
from internvl_launch.resolver import ENGINE_RULES, estimate_memory, resolve_plan

REGISTRY = load_registry()
SPECS = [(f, s, q) for f in REGISTRY.families for s in f.specs for q in s.quantizations]


def documented_engine(spec: Spec, quantization: str, env: Environment) -> str | None:
    """The engine rules as README states them, written independently of the resolver."""
    gpu = bool(env.gpus)
    vllm_ok = env.engine("vllm").available and env.engine("vllm").variant == "cuda" and gpu
    if spec.pixel_shuffle == "v1":  # vLLM computes v1 only with the checkpoint's own code, not asked for here
        if spec.format == "awq":
            return "transformers" if env.has_package("gptqmodel") else None
        if quantization == "none":
            return "transformers"
    if spec.format == "awq":
        if vllm_ok and all(float(g.compute_capability or 0) >= 7.5 for g in env.gpus):
            return "vllm"
        return "transformers" if env.has_package("gptqmodel") else None
    if quantization == "none":
        return "vllm" if vllm_ok else "transformers"
    if quantization == "Int8":
        return None  # saved already quantized by bitsandbytes: no engine reads it
    return "transformers"  # 4-bit, 8-bit: bitsandbytes in Transformers at load time


@pytest.mark.parametrize("env_name", list(ENVIRONMENTS))
@pytest.mark.parametrize(
    ("family", "spec", "quantization"),
    SPECS,
    ids=[f"{f.name}-{s.size_label}b-{s.format}-{q}" for f, s, q in SPECS],
)
def test_every_spec_resolves_in_every_environment(family: Family, spec: Spec, quantization: str, env_name: str) -> None:
    env = ENVIRONMENTS[env_name]
    request = LaunchRequest(family.name, size=spec.size, format=spec.format, quantization=quantization)
    expected = documented_engine(spec, quantization, env)
    if expected is None:
        with pytest.raises(EngineUnavailableError) as info:
            resolve_plan(REGISTRY, request, env)
        if quantization == "Int8":
            assert "--quantization 8-bit at --size-in-billions 26" in (info.value.hint or "")
        elif spec.pixel_shuffle == "v1":
            assert "--trust-remote-code" in (info.value.hint or "") and "--quantization 4-bit" in (
                info.value.hint or ""
            )

        else:
            assert "Install vLLM" in (info.value.hint or "") and "--quantization 4-bit" in (info.value.hint or "")
        return
    try:
        plan = resolve_plan(REGISTRY, request, env)
    except NotEnoughMemoryError as exc:
        memory = exc.details["memory_gib"]
        assert isinstance(memory, dict) and memory["per_device"] > memory["available"]
        assert family.name != "internvl-tiny"
        return
    assert plan.engine == expected
    # A spec with a native-layout twin is planned on the twin: same spec, native layout, no conversion.
    twin = bool(spec.native_hubs)
    assert plan.spec == (replace(spec, layout="native") if twin else spec) and plan.quantization == quantization
    assert plan.needs_conversion == (spec.layout == "original" and not twin)
    if "huggingface" in spec.hubs:
        assert plan.repo_id == (spec.native_hubs["huggingface"] if twin else spec.repo_id("huggingface", quantization))
    assert plan.memory.fits
    assert plan.device == ("cuda" if env.gpus else "cpu")
    if plan.device == "cuda":
        assert plan.dtype == (
            "float16" if env_name == "1xV100-32GB" or (spec.format == "awq" and plan.engine == "vllm") else "bfloat16"
        )
    if plan.engine == "vllm":
        tp, kv = plan.tensor_parallel_size, spec.llm.kv_heads
        assert spec.llm.attention_heads % tp == 0
        assert (kv % tp == 0) if tp <= kv else (tp % kv == 0), "vLLM shards or replicates the key/value heads"
        vision_splits = spec.vision.heads is not None and spec.vision.heads % tp == 0
        assert plan.mm_encoder_tp_mode == (None if tp == 1 or vision_splits else "data")
    assert plan.memory.per_device <= min(g.memory_free_mib for g in env.gpus) / 1024 if env.gpus else True
    if (plan.quantization in ("4-bit", "8-bit") or spec.format == "awq") and spec.llm.hidden_size:
        # What stays in 16-bit: the embeddings and the head.
        assert plan.memory.llm_weights * 2**30 > 2 * spec.llm.hidden_size * spec.llm.vocab_size  # type: ignore[operator]
    if (
        plan.quantization_config
        and plan.quantization_config["method"] == "bitsandbytes"
        and not plan.quantization_config.get("prequantized")
    ):
        assert plan.quantization_config["skip_modules"] == [
            "model.vision_tower",
            "model.multi_modal_projector",
            "lm_head",
        ]
    assert plan.repo_id and "{" not in plan.repo_id


def test_every_rule_is_reachable_from_a_shipped_spec() -> None:
    from internvl_launch.resolver import quant_kind

    used = {(s.format, quant_kind(s.format, q)) for _, s, q in SPECS}
    assert {(r.format, r.quant_kind) for r in ENGINE_RULES} == used


def plan(env: str | Environment, **kw: object):
    e = ENVIRONMENTS[env] if isinstance(env, str) else env
    return resolve_plan(REGISTRY, LaunchRequest(**kw), e)  # type: ignore[arg-type]


def test_4bit_on_a_24gb_gpu_uses_transformers_with_bitsandbytes() -> None:
    p = plan("1x24GB", model_name="internvl2", size=8, quantization="4-bit")
    assert (p.engine, p.device, p.gpu_indices, p.dtype) == ("transformers", "cuda", (0,), "bfloat16")
    assert p.quantization_config == {
        "method": "bitsandbytes",
        "bits": 4,
        "skip_modules": ["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "bfloat16",
    }
    assert p.rejected_engines["vllm"].startswith("vLLM is only offered for quantization none")
    assert (p.hub, p.repo_id, p.fallback) == (
        "huggingface",
        "OpenGVLab/InternVL2-8B",
        (("modelscope", "OpenGVLab/InternVL2-8B"),),
    )


def test_vllm_refused_for_bitsandbytes_with_the_reason() -> None:
    with pytest.raises(
        EngineUnavailableError, match="Engine vllm cannot run pytorch 4-bit: vLLM is only offered for quantization none"
    ):
        plan("1x80GB", model_name="internvl2", size=8, quantization="4bit", engine="vllm")


def test_full_precision_prefers_vllm_on_a_gpu_and_transformers_without() -> None:
    assert plan("1x80GB", model_name="internvl2", size=8).engine == "vllm"
    p = plan("1x80GB", model_name="internvl2", size=8, engine="transformers")
    assert p.engine == "transformers" and p.rejected_engines["vllm"] == "--model-engine transformers was asked for"
    no_vllm = make_env([("H100", 80)], vllm=None)
    p = plan(no_vllm, model_name="internvl2", size=8)
    assert p.engine == "transformers" and "not importable" in p.rejected_engines["vllm"]


def test_76b_does_not_fit_one_gpu_and_the_error_gives_numbers() -> None:
    with pytest.raises(NotEnoughMemoryError) as info:
        plan("1x80GB", model_name="internvl2", size=76)
    msg = str(info.value)
    assert msg.startswith("76B pytorch none needs about ") and "the 1 GPU(s) found have 80.0 GiB free in all" in msg
    assert info.value.hint and info.value.hint.startswith("Try --quantization 4-bit")


def test_76b_spreads_over_the_fewest_gpus_that_fit() -> None:
    p = plan("8x80GB", model_name="internvl2", size=76)
    assert p.engine == "vllm" and p.tensor_parallel_size in (2, 4, 8)
    assert p.gpu_indices == tuple(range(p.tensor_parallel_size))
    smaller = p.tensor_parallel_size // 2
    assert not estimate_memory(p.spec, "none", "bfloat16", p.max_model_len, smaller, "vllm", 80.0).fits
    t = plan("8x80GB", model_name="internvl2", size=76, engine="transformers")
    assert t.device_map == "split" and t.tensor_parallel_size == 1 and len(t.gpu_indices) >= 2


def test_tensor_parallel_must_divide_attention_heads() -> None:
    # InternVL2-40B's LLM has 56 heads: 3 GPUs cannot split them; a placement error, not a memory one.
    with pytest.raises(PlacementError, match="3 GPU\\(s\\): 3 does not divide the 56 attention heads") as info:
        plan("8x80GB", model_name="internvl2", size=40, gpus=3)
    assert "--gpus 1 or 2 or 4 or 8" in (info.value.hint or "")
    assert plan("8x80GB", model_name="internvl2", size=40, gpus=4).tensor_parallel_size == 4


@pytest.mark.parametrize(
    ("size", "gpus", "problem"),
    [
        # InternVL2-1B: 14 heads, 2 KV heads; 7 divides 14, but KV heads replicate only to multiples of 2.
        (1, 7, "7 is not a multiple of the 2 key/value heads"),
        # InternVL2-40B: 56 heads, 8 KV heads; 7 divides 56 but not 8.
        (40, 7, "7 does not divide the 8 key/value heads"),
    ],
)
def test_tensor_parallel_must_fit_key_value_heads(size: int, gpus: int, problem: str) -> None:
    with pytest.raises(PlacementError, match=problem):
        plan("8x80GB", model_name="internvl2", size=size, gpus=gpus)


def test_more_gpus_than_found_is_a_placement_error(run_cli, env_file) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PlacementError, match="--gpus 3 was asked for, but 1 GPU"):
        plan("1x80GB", model_name="internvl2", size=8, gpus=3)
    code, out, _ = run_cli(
        "resolve", "-n", "internvl2", "-s", "40", "--gpus", "3", "--environment", env_file("8x80GB"), "--json"
    )
    assert code == 13 and json.loads(out)["error"] == "PlacementError"


def test_vision_heads_that_do_not_divide_use_data_parallel_encoder() -> None:
    # InternViT-6B has 25 heads: no tensor-parallel size above 1 divides them.
    p = plan("8x80GB", model_name="internvl2", size=26, gpus=2)
    assert p.tensor_parallel_size == 2 and p.mm_encoder_tp_mode == "data"
    assert any(r.flag == "--mm-encoder-tp-mode data" for r in p.requirements)
    small = plan("8x80GB", model_name="internvl2", size=8, gpus=2)  # InternViT-300M: 16 heads
    assert small.tensor_parallel_size == 2 and small.mm_encoder_tp_mode is None
    assert plan("8x80GB", model_name="internvl2", size=26, gpus=1).mm_encoder_tp_mode is None


def test_awq_on_vllm_needs_compute_capability_7_5() -> None:
    v100 = make_env([("Tesla V100-SXM2-32GB", 32)], compute="7.0")
    with pytest.raises(EngineUnavailableError) as info:
        plan(v100, model_name="internvl2", size=8, format="awq")
    assert "compute capability 7.5 or newer; GPU 0 (Tesla V100-SXM2-32GB) has 7.0" in str(info.value)
    t4 = make_env([("Tesla T4", 16)], compute="7.5")
    p = plan(t4, model_name="internvl2", size=2, format="awq")
    assert p.engine == "vllm" and any(r.kind == "compute_capability" for r in p.requirements)
    # With an AWQ kernel package for Transformers, a V100 falls back to it.
    v100_gptq = make_env([("Tesla V100-SXM2-32GB", 32)], compute="7.0", packages={"gptqmodel": "2.0"})
    p = plan(v100_gptq, model_name="internvl2", size=8, format="awq")
    assert p.engine == "transformers" and "compute capability 7.5" in p.rejected_engines["vllm"]


def test_quantized_estimates_count_embeddings_and_head_in_16_bit() -> None:
    spec = next(s for s in REGISTRY.family("internvl2").specs if s.size == 8 and s.format == "pytorch")
    assert spec.llm.hidden_size and spec.llm.vocab_size
    four = estimate_memory(spec, "4-bit", "bfloat16", 0, 1, "transformers", None)
    llm_params = (spec.size - spec.vision.params_b) * 1e9
    sixteen = 2 * spec.llm.hidden_size * spec.llm.vocab_size
    expected = ((llm_params - sixteen) * 0.5 + sixteen * 2) / 2**30
    assert four.llm_weights == pytest.approx(expected)
    # About 1 GiB more than counting every parameter at 4 bits (the figure for 8B).
    assert 0.9 < four.llm_weights - llm_params * 0.5 / 2**30 < 1.3
    full = estimate_memory(spec, "none", "bfloat16", 0, 1, "transformers", None)
    assert full.llm_weights == pytest.approx(llm_params * 2 / 2**30)


def test_awq_without_vllm_or_kernels_names_the_ways_out() -> None:
    with pytest.raises(EngineUnavailableError) as info:
        plan("no-gpu", model_name="internvl2", size=8, format="awq")
    assert str(info.value).startswith("No engine can run awq Int4 here: vllm: vllm is not importable")
    assert "no AWQ kernel package (gptqmodel)" in str(info.value)
    with_kernels = make_env([("RTX 4090", 24)], vllm=None, packages={"gptqmodel": "2.0"})
    p = plan(with_kernels, model_name="internvl2", size=8, format="awq")
    assert p.engine == "transformers" and p.quantization_config and p.quantization_config["method"] == "awq"
    p = plan("1x24GB", model_name="internvl2:8b-awq")
    assert (p.engine, p.dtype, p.repo_id) == ("vllm", "float16", "OpenGVLab/InternVL2-8B-AWQ")


def test_tiny_runs_on_cpu_anywhere() -> None:
    p = plan("no-gpu", model_name="internvl-tiny")
    assert (p.engine, p.device, p.dtype, p.hub, p.repo_id, p.needs_conversion) == (
        "transformers",
        "cpu",
        "float32",
        "builtin",
        "internvl-tiny",
        False,
    )
    assert p.memory.fits and p.memory.total < 2
    assert plan("no-gpu", model_name="tiny", quantization="4bit").quantization_config["bits"] == 4  # type: ignore[index]


def test_vllm_cpu_build_only_when_asked() -> None:
    cpu_vllm = make_env([], vllm="cpu")
    assert plan(cpu_vllm, model_name="internvl-tiny").engine == "transformers"
    assert plan(cpu_vllm, model_name="internvl-tiny", engine="vllm").engine == "vllm"
    with pytest.raises(EngineUnavailableError, match="the installed vLLM is the CUDA build"):
        plan(make_env([], vllm="cuda"), model_name="internvl-tiny", engine="vllm")


def test_device_cpu_is_honoured_and_cuda_without_gpu_refused() -> None:
    p = plan("1x80GB", model_name="internvl2", size=1, device="cpu")
    assert (p.device, p.engine, p.dtype) == ("cpu", "transformers", "float32")
    with pytest.raises(EngineUnavailableError, match="--device cuda was asked for, but no CUDA GPU was found"):
        plan("no-gpu", model_name="internvl2", size=1, device="cuda")


def test_defaults_pick_pytorch_none_and_the_smallest_size_and_say_so() -> None:
    p = plan("1x80GB", model_name="internvl2")
    assert (p.spec.size, p.spec.format, p.quantization) == (1, "pytorch", "none")
    assert any(r.startswith("size not given: picked the smallest, 1B") for r in p.reasons)
    assert any(r.startswith("format not given: picked pytorch") for r in p.reasons)


def test_no_matching_spec_lists_what_exists() -> None:
    with pytest.raises(NoMatchingSpecError) as info:
        plan("1x80GB", model_name="internvl2", size=3)
    assert str(info.value) == "internvl2 has no spec with size 3B."
    assert info.value.hint and "1B pytorch [4-bit, 8-bit, none]" in info.value.hint
    with pytest.raises(NoMatchingSpecError, match="internvl2 has no spec with quantization int4 at 4B"):
        plan("1x80GB", model_name="internvl2", size=4, quantization="int4")
    with pytest.raises(UnknownModelError):
        plan("1x80GB", model_name="internvl9")


def test_bf16_needs_ampere() -> None:
    t4 = make_env([("Tesla T4", 16)], compute="7.5")
    assert plan(t4, model_name="internvl2", size=1).dtype == "float16"


def test_hub_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    p = plan("1x80GB", model_name="internvl2", size=8, hub="modelscope")
    assert (p.hub, p.fallback) == ("modelscope", (("huggingface", "OpenGVLab/InternVL2-8B"),))
    monkeypatch.setenv("INTERNVL_HUB", "modelscope")
    assert plan("1x80GB", model_name="internvl2", size=8).hub == "modelscope"
    int8 = next(s for s in REGISTRY.family("internvl-chat").specs if "Int8" in s.quantizations)
    assert int8.repo_id("modelscope", "Int8") == "AI-ModelScope/InternVL-Chat-V1-5-Int8"
    with pytest.raises(EngineUnavailableError, match="does not read weights saved already quantized"):
        plan("1x80GB", model_name="internvl-chat", size=26, quantization="int8")


def test_revision_and_max_model_len() -> None:
    p = plan("1x80GB", model_name="internvl2", size=8, revision="abc123", max_model_len=4096)
    assert p.revision == "abc123" and p.max_model_len == 4096 and p.memory.kv_tokens == 4096
    assert plan("1x80GB", model_name="internvl2", size=8, max_model_len=10**6).max_model_len == 32768


def test_memory_check_can_be_skipped() -> None:
    p = plan("1x24GB", model_name="internvl2", size=76, memory_check=False)
    assert not p.memory.fits


def test_missing_bitsandbytes_is_named() -> None:
    env = make_env([("RTX 4090", 24)], packages={"bitsandbytes": None})
    with pytest.raises(
        EngineUnavailableError, match=r"bitsandbytes is not installed \(pip install 'internvl-launch\[quant\]'\)"
    ):
        plan(env, model_name="internvl2", size=8, quantization="8-bit")


def test_pixel_shuffle_v1_runs_on_transformers_or_on_vllm_with_the_checkpoints_code() -> None:
    # InternVL 1.5: the Transformers engine computes v1 on the conversion; vLLM's native model only v2.
    p = plan("1x80GB", model_name="internvl-chat", size=2)
    assert p.engine == "transformers" and p.needs_conversion
    assert "pass --trust-remote-code" in p.rejected_engines["vllm"]
    with pytest.raises(EngineUnavailableError, match="pass --trust-remote-code") as info:
        plan("1x80GB", model_name="internvl-chat", size=2, engine="vllm")
    assert "--model-engine transformers" in (info.value.hint or "")
    p = plan("1x80GB", model_name="internvl-chat", size=2, trust_remote_code=True)
    assert p.engine == "vllm" and not p.needs_conversion
    assert [r.kind for r in p.requirements] == ["remote_code", "limit"]
    assert p.requirements[0].flag == "--trust-remote-code" and "pixel shuffle v1" in p.requirements[0].detail
    assert "no video" in p.requirements[1].detail and "internlm2" in p.requirements[1].detail
    # An InternVL2 checkpoint with the same flag: served as is, said up front.
    p = plan("1x80GB", model_name="internvl2", size=2, trust_remote_code=True)
    assert p.engine == "vllm" and not p.needs_conversion and p.requirements[0].kind == "remote_code"
    assert plan("1x80GB", model_name="internvl2", size=2).needs_conversion


def test_context_never_exceeds_the_language_models_own() -> None:
    # InternVL2-40B's Yi-34B reads 4096 positions, Llama3-76B's 8192: vLLM refuses a longer --max-model-len.
    p = plan("8x80GB", model_name="internvl2", size=40)
    assert p.max_model_len == p.context_length == 4096 and p.memory.kv_tokens == 4096
    assert any("Nous-Hermes-2-Yi-34B's max_position_embeddings" in r for r in p.reasons)
    assert plan("8x80GB", model_name="internvl2", size=76, max_model_len=20000).max_model_len == 8192
    assert plan("8x80GB", model_name="internvl2", size=8).max_model_len == 32768


def test_a_native_twin_is_preferred_and_needs_no_conversion() -> None:
    from dataclasses import replace

    from internvl_launch.registry import Registry

    family = REGISTRY.family("internvl3")
    twinned = tuple(
        replace(s, native_hubs={"huggingface": s.hubs["huggingface"] + "-hf"}) if s.format == "pytorch" else s
        for s in family.specs
    )
    registry = Registry((replace(family, specs=twinned),))
    p = resolve_plan(registry, LaunchRequest("internvl3", size=8), ENVIRONMENTS["1x80GB"])
    assert (p.repo_id, p.needs_conversion, p.spec.layout) == ("OpenGVLab/InternVL3-8B-hf", False, "native")
    assert p.fallback[-2:] == (("huggingface", "OpenGVLab/InternVL3-8B"), ("modelscope", "OpenGVLab/InternVL3-8B"))
    assert any("native-layout twin" in r for r in p.reasons)
    assert not any(r.kind == "conversion" for r in p.requirements)
    # vLLM with the checkpoint's own code asked for serves the original as it is.
    p = resolve_plan(registry, LaunchRequest("internvl3", size=8, trust_remote_code=True), ENVIRONMENTS["1x80GB"])
    assert p.repo_id == "OpenGVLab/InternVL3-8B" and p.engine == "vllm" and not p.needs_conversion
    # AWQ exports have no twin.
    awq = resolve_plan(registry, LaunchRequest("internvl3", size=8, format="awq"), ENVIRONMENTS["1x80GB"])
    assert awq.repo_id == "OpenGVLab/InternVL3-8B-AWQ" and awq.needs_conversion
    # Video on vLLM: Qwen backbones yes (no limit), InternLM2 no.
    assert not any(r.kind == "limit" for r in p.requirements)
