"""Every registry spec, end to end, against a replica of its real repository.

Each spec's repository is replicated (internvl_launch/checkpoint/replica.py:
the real file names and formats, config keys, head counts, tokenizer kind,
AWQ packing; tiny dimensions) and served by the stand-in Hub. Then, as a user
on this kind of machine would run it: plan (no GPU, no vLLM), download through
huggingface_hub, convert where the plan says so, load, one image chat.

docs/specs.md is the contract: each row's cells (✔, or ✘ with the reason) are
what this test observes, and a row that differs fails. `make specs-doc`
rewrites the table from what is observed (SPECS_DOC_WRITE=1). The
vLLM-cpu column is observed by `make test-vllm` (tests/test_replicas_vllm.py).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import specs_doc
from conftest import make_env
from standin_hub import StandInHub

from internvl_launch.checkpoint.replica import cached_replica, load_facts
from internvl_launch.errors import InternVLError
from internvl_launch.registry import Family, Spec, load_registry
from internvl_launch.request import LaunchRequest
from internvl_launch.resolver import resolve_plan

REGISTRY = load_registry()
ROWS = specs_doc.registry_rows(REGISTRY)
#: CI's kind of machine as the resolver sees it: no GPU, the Transformers
#: engine with bitsandbytes, no vLLM.
CPU = make_env([], vllm=None)
#: The same machine with vLLM's CPU build, asked for by name.
CPU_VLLM = make_env([], vllm="cpu")

OBSERVED: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def write_specs_doc():  # type: ignore[no-untyped-def]
    """With SPECS_DOC_WRITE=1 (`make specs-doc`), docs/specs.md gets
    what this run observed, once the whole module has run."""
    yield
    if os.environ.get("SPECS_DOC_WRITE") and OBSERVED:
        specs_doc.write_table(OBSERVED, columns=specs_doc.LOCAL_COLUMNS)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with StandInHub() as h:
        yield h


@pytest.fixture(scope="module")
def replica_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replicas")


def default_request(family: Family, spec: Spec) -> LaunchRequest:
    quantization = "none" if "none" in spec.quantizations else spec.quantizations[0]
    # The replica is tiny; the spec's real size would not fit this machine's memory.
    return LaunchRequest(family.name, size=spec.size, format=spec.format, quantization=quantization, memory_check=False)


def short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if isinstance(err, InternVLError) else f"{type(err).__name__}: {text}"


def run_row(family: Family, spec: Spec, hub: StandInHub, root: Path) -> dict[str, str]:
    """Plan, download, convert, load and chat; the cell of each step."""
    from internvl_launch.api import load_plan
    from internvl_launch.weights import fetch_weights, locate_weights

    cells = dict.fromkeys(specs_doc.LOCAL_COLUMNS, specs_doc.NOT_REACHED)
    request = default_request(family, spec)
    try:
        plan = resolve_plan(REGISTRY, request, CPU)
        refusal = None
    except InternVLError as err:
        plan, refusal = None, err
    if refusal is not None and spec.format != "awq":
        cells["download"] = f"✘ refused by the plan: {specs_doc.reason(refusal)}"
        return cells
    # A spec no engine here can run is still fetched and converted as vLLM would get it.
    try:
        fetch_plan = plan or resolve_plan(REGISTRY, replace(request, engine="vllm"), CPU_VLLM)
    except InternVLError:
        cells["download"] = f"✘ refused by the plan: {specs_doc.reason(refusal)}"
        return cells
    # The repository the plan fetches first (a native-layout twin where one exists).
    hub.add_directory(fetch_plan.repo_id, cached_replica(fetch_plan.repo_id, root))
    try:
        fetched = fetch_weights(fetch_plan)
        assert not [f for f in fetched.files if f.endswith(".py")], "remote code was downloaded"
        cells["download"] = specs_doc.OK
    except Exception as err:
        cells["download"] = f"✘ {short(err)}"
        return cells
    try:
        weights = locate_weights(fetch_plan)
        cells["convert"] = specs_doc.OK if fetch_plan.needs_conversion else "– native layout"
        assert (weights / "config.json").is_file()
    except Exception as err:
        cells["convert"] = f"✘ {short(err)}"
        return cells
    if plan is None:
        cells["load"] = f"✘ {specs_doc.reason(refusal)}"
        return cells
    try:
        model = load_plan(plan)
        cells["load"] = specs_doc.OK
    except Exception as err:
        cells["load"] = f"✘ {short(err)}"
        return cells
    try:
        completion = model.chat_messages(specs_doc.image_chat(640, 480), max_tokens=4, temperature=0)
        # 640x480 within the spec's 12 tiles: a 4x3 grid plus the thumbnail, 13 x 256 image tokens.
        assert completion.prompt_tokens > 13 * 256, completion.prompt_tokens
        assert 1 <= completion.completion_tokens <= 4
        cells["chat"] = specs_doc.OK
    except Exception as err:
        cells["chat"] = f"✘ {short(err)}"
    return cells


@pytest.mark.slow
@pytest.mark.parametrize(("family", "spec"), [(f, s) for f, s, _ in ROWS], ids=[row for _, _, row in ROWS])
def test_spec_runs_end_to_end_on_its_replica(
    family: Family, spec: Spec, hub: StandInHub, replica_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    row = specs_doc.row_name(family, spec)
    observed = run_row(family, spec, hub, replica_root)
    OBSERVED[row] = observed
    documented = specs_doc.read_table().get(row, {})
    if os.environ.get("SPECS_DOC_WRITE"):
        return
    assert {k: documented.get(k, "") for k in specs_doc.LOCAL_COLUMNS} == observed, (
        f"{row}: docs/specs.md says {documented}, this run observed {observed}; run `make specs-doc` if intended"
    )


def test_every_spec_has_facts_and_a_row() -> None:
    facts = load_facts()
    repos = [(row, s.repo_id("huggingface", s.quantizations[0])) for f, s, row in ROWS]
    repos += [(row, s.native_hubs["huggingface"]) for f, s, row in ROWS if "huggingface" in s.native_hubs]
    missing = [f"{row}: {repo}" for row, repo in repos if repo not in facts]
    assert not missing, f"specs without replica facts: {missing}"
    table = specs_doc.read_table()
    assert sorted(table) == sorted(row for _, _, row in ROWS), "docs/specs.md rows differ from the registry"


@pytest.mark.parametrize(("family", "spec"), [(f, s) for f, s, _ in ROWS], ids=[row for _, _, row in ROWS])
def test_registry_figures_match_the_real_repository(family: Family, spec: Spec) -> None:
    """The spec's head counts, widths and vocabulary (which the resolver's
    placement and memory estimate use) are the real repository's."""
    facts = load_facts()[spec.repo_id("huggingface", spec.quantizations[0])]
    llm = facts.llm
    assert (spec.llm.attention_heads, spec.llm.kv_heads) == (llm["num_attention_heads"], llm["num_key_value_heads"])
    assert spec.llm.hidden_size == llm["hidden_size"] and spec.llm.vocab_size == llm["vocab_size"]
    assert spec.llm.max_position_embeddings == llm["max_position_embeddings"]
    assert spec.vision.heads == facts.vision["num_attention_heads"]
    assert spec.template == facts.config["template"]
    assert spec.max_tiles == facts.config["max_dynamic_patch"]
    assert spec.weights == facts.weights, "the plan must say beforehand that the weights are pickles"
    assert spec.pixel_shuffle == facts.config.get("ps_version", "v1"), "the plan must know what converts"
    assert (spec.format == "awq") == bool(facts.quantization and facts.quantization["quant_method"] == "awq")


def test_internvl_1_5_chats_on_the_transformers_engine_from_the_cli(
    hub: StandInHub,
    replica_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    run_cli,  # type: ignore[no-untyped-def]
) -> None:
    """`internvl chat -n internvl-chat -s 2` with pixel shuffle v1, from its replica, as a user would type it."""
    import json

    from PIL import Image

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = "OpenGVLab/Mini-InternVL-Chat-2B-V1-5"
    hub.add_directory(repo, cached_replica(repo, replica_root))
    Image.new("RGB", (640, 480), (30, 120, 200)).save(tmp_path / "a.png")
    code, out, err = run_cli(
        "chat", "-n", "internvl-chat", "-s", "2", "--image", str(tmp_path / "a.png"), "Describe.", "--max-tokens", "2",
        "--json", "--no-memory-check",
    )  # fmt: skip
    assert code == 0, err
    reply = json.loads(out)
    assert reply["prompt_tokens"] > 13 * 256 and reply["completion_tokens"] >= 1
    assert reply["model"].startswith("internvl-chat:2b")


def test_list_and_show_name_the_native_twins(run_cli) -> None:  # type: ignore[no-untyped-def]
    import json

    code, out, _ = run_cli("list", "-n", "internvl3.5", "--json")
    rows = json.loads(out)
    assert code == 0 and rows[0]["native_hubs"]["huggingface"] == "OpenGVLab/InternVL3_5-1B-HF" and rows[0]["thinking"]
    code, out, _ = run_cli("list", "-n", "internvl3")
    assert "OpenGVLab/InternVL3-1B (native: OpenGVLab/InternVL3-1B-hf)" in out
