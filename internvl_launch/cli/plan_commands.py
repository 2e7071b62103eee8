"""`internvl resolve` and `internvl launch --dry-run`: the launch plan."""

from __future__ import annotations

from typing import Any

import click

from internvl_launch.cli._options import json_option, model_options
from internvl_launch.cli._output import emit_json
from internvl_launch.environment import Environment, load_environment, probe_environment
from internvl_launch.registry import load_registry
from internvl_launch.request import LaunchRequest
from internvl_launch.resolver import ENGINE_RULES, LaunchPlan, resolve_plan


def request_from_flags(flags: dict[str, Any]) -> LaunchRequest:
    """The request the shared model flags describe."""
    if not flags["model_name"] and not flags["model_path"]:
        raise click.UsageError("Name a model with --model-name, or give a checkpoint directory with --model-path.")
    return LaunchRequest(
        model_name=flags["model_name"],
        model_path=flags["model_path"],
        template=flags["template"],
        size=flags["size"],
        format=flags["fmt"],
        quantization=flags["quantization"],
        engine=flags["engine"],
        hub=flags["hub"],
        revision=flags["revision"],
        device=flags["device"],
        gpus=flags["gpus"],
        max_model_len=flags["max_model_len"],
        memory_check=not flags["no_memory_check"],
        trust_remote_code=bool(flags.get("trust_remote_code")),
    )


def plan_from_flags(flags: dict[str, Any]) -> tuple[LaunchPlan, Environment]:
    """Build the request from parsed flags, load the registry, look at the
    machine (or the --environment file) and resolve."""
    request = request_from_flags(flags)
    registry = load_registry(flags["specs_dirs"])
    env = (
        load_environment(flags["environment_file"])
        if flags["environment_file"]
        else probe_environment(flags["vllm_python"])
    )
    return resolve_plan(registry, request, env), env


def render_plan(plan: LaunchPlan, env: Environment, explain: bool) -> None:
    """The plan for a person to read, on stdout."""
    s = plan.spec
    m = plan.memory
    echo = click.echo
    echo(f"model      {plan.model_ref}  ({s.llm.name} + {s.vision.name}, template {s.template})")
    echo(f"engine     {plan.engine}  ({plan.engine_python})")
    rev = f" @ {plan.revision}" if plan.revision else ""
    echo(
        f"weights    {plan.hub}: {plan.repo_id}{rev}"
        + ("  -> converted to the Transformers-native layout" if plan.needs_conversion else "")
    )
    for hub, repo in plan.fallback:
        echo(f"           fallback {hub}: {repo}")
    place = "cpu" if plan.device == "cpu" else f"cuda, GPU {', '.join(map(str, plan.gpu_indices))}"
    if plan.tensor_parallel_size > 1:
        place += f", tensor parallel {plan.tensor_parallel_size}"
        if plan.mm_encoder_tp_mode:
            place += f" (vision encoder {plan.mm_encoder_tp_mode}-parallel)"
    if plan.device_map == "split":
        place += ", layers split across GPUs (device map)"
    echo(f"device     {place}; dtype {plan.dtype}")
    if plan.quantization_config:
        q = plan.quantization_config
        skip = f", kept in full precision: {', '.join(q['skip_modules'])}" if q.get("skip_modules") else ""
        echo(f"quantize   {q['method']} {q['bits']}-bit{skip}")
    avail = f"{m.available:.1f} GiB available per device" if m.available is not None else "available memory unknown"
    echo(
        f"memory     ~{m.total:.1f} GiB = LLM {m.llm_weights:.1f} + vision {m.vision_weights:.1f} + "
        f"KV cache {m.kv_cache:.1f} ({m.kv_tokens} tokens) + overhead {m.overhead:.1f}; "
        f"{m.per_device:.1f} GiB per device; {avail}" + ("" if m.fits else "  (DOES NOT FIT)")
    )
    echo(f"context    {plan.max_model_len} tokens; up to {s.max_tiles} tiles per image; stop {', '.join(s.stop)}")
    for need in plan.requirements:
        echo(f"needs      {need.kind}: {need.detail}" + (f" [{need.flag}]" if need.flag else ""))
    if plan.provenance:
        width = max(len(k) for k in plan.provenance)
        echo("from")
        for what, where in plan.provenance.items():
            echo(f"  {what.ljust(width)}  {where}")
    if explain:
        echo("")
        echo("why:")
        for reason in plan.reasons:
            echo(f"  - {reason}")
        for engine, reason in plan.rejected_engines.items():
            echo(f"  - not {engine}: {reason}")
        echo(
            f"  - machine: {len(env.gpus)} GPU(s) ({env.gpu_probe}), {env.host_memory_available_mib / 1024:.1f} GiB host memory available"
        )


def _plan_json(plan: LaunchPlan, env: Environment, explain: bool) -> dict[str, Any]:
    data = plan.to_dict()
    if explain:
        data["explain"] = {
            "engine_rules": [
                {"format": r.format, "quantization_kind": r.quant_kind, "engines": list(r.engines), "why": r.why}
                for r in ENGINE_RULES
            ],
            "environment": {"source": env.source, "gpus": len(env.gpus), "gpu_probe": env.gpu_probe},
            "memory_rule": "LLM params x bytes per param (bf16 2, 8-bit 1, 4-bit 0.5, AWQ 0.52) + vision tower "
            "in 16-bit + KV cache 2 x layers x kv_heads x head_dim x 2 bytes x max_model_len + 0.75 GiB + 5%",
        }
    return data


@click.command("resolve")
@model_options
@json_option
@click.option("--explain", is_flag=True, help="Say why each choice was made, and why not each other engine.")
@click.option("--trust-remote-code", is_flag=True, help="Plan as a launch that allows the checkpoint's own code would.")
def resolve_command(as_json: bool, explain: bool, **flags: Any) -> None:
    """Print the launch plan without downloading or loading anything."""
    plan, env = plan_from_flags(flags)
    if as_json:
        emit_json(_plan_json(plan, env, explain))
    else:
        render_plan(plan, env, explain)


def launch_plan_json(plan: LaunchPlan, env: Environment) -> dict[str, Any]:
    """What `launch --dry-run --json` prints: the plan with its explanation."""
    return _plan_json(plan, env, True)
