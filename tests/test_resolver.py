from __future__ import annotations

import pytest
from conftest import ENVIRONMENTS, make_env

from internvl_launch.environment import Environment
from internvl_launch.errors import EngineUnavailableError, NoMatchingSpecError, NotEnoughMemoryError, UnknownModelError
from internvl_launch.registry import Family, Spec, load_registry
from internvl_launch.request import LaunchRequest
from internvl_launch.resolver import ENGINE_RULES, estimate_memory, resolve_plan

REGISTRY = load_registry()
SPECS = [(f, s, q) for f in REGISTRY.families for s in f.specs for q in s.quantizations]


def documented_engine(spec: Spec, quantization: str, env: Environment) -> str | None:
    """The engine rules as README states them, written independently of the resolver."""
    gpu = bool(env.gpus)
    vllm_ok = env.engine("vllm").available and env.engine("vllm").variant == "cuda" and gpu
    if spec.format == "awq":
        if vllm_ok:
            return "vllm"
        return "transformers" if env.has_package("gptqmodel") else None
    if quantization == "none":
        return "vllm" if vllm_ok else "transformers"
    return "transformers"  # 4-bit, 8-bit, Int8: bitsandbytes in Transformers


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
    assert plan.spec == spec and plan.quantization == quantization
    assert plan.memory.fits
    assert plan.device == ("cuda" if env.gpus else "cpu")
    if plan.engine == "vllm":
        assert spec.llm.attention_heads % plan.tensor_parallel_size == 0
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


def test_tensor_parallel_must_divide_heads() -> None:
    # InternVL2-40B's LLM has 56 heads: 3 GPUs cannot split them.
    with pytest.raises(NotEnoughMemoryError, match="must divide the 56 attention heads; 3 GPU"):
        plan("8x80GB", model_name="internvl2", size=40, gpus=3)
    assert plan("8x80GB", model_name="internvl2", size=40, gpus=4).tensor_parallel_size == 4


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
    p = plan("1x80GB", model_name="internvl-chat", size=26, quantization="int8")
    assert p.repo_id == "AI-ModelScope/InternVL-Chat-V1-5-Int8" and p.engine == "transformers"


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
