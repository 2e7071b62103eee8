"""Downloads through the real `huggingface_hub` client against a stand-in Hub
on loopback: which files are fetched, revisions, resume, offline mode,
fallback, and `internvl download` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from standin_hub import StandInHub, StandInModelScope

from internvl_launch.checkpoint.convert import CONVERTER_VERSION
from internvl_launch.checkpoint.tiny import TinyConfig, generate_tiny
from internvl_launch.errors import DownloadError
from internvl_launch.hub import download, select_files


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    ckpt = generate_tiny(tmp_path_factory.mktemp("hubtiny") / "ckpt", TinyConfig())
    files = {str(p.relative_to(ckpt)): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    files["README.md"] = b"# tiny\n"
    files["modeling_internvl_chat.py"] = b"raise SystemExit('remote code ran')\n"
    files["training_args.bin"] = b"\x80\x04pickle"
    return files


def hub_spec(specs: Path, name: str, repo_id: str, changes: dict[str, str] | None = None) -> Path:
    """A spec directory with one family: the built-in tiny spec renamed and
    pointed at `repo_id` on Hugging Face, with `changes` (old -> new text)."""
    text = (
        Path(__file__)
        .parent.parent.joinpath("specs", "internvl-tiny.yaml")
        .read_text()
        .replace("name: internvl-tiny", f"name: {name}")
        .replace("aliases: [tiny, internvl-tiny-random]", "aliases: []")
        .replace("hubs: {builtin: internvl-tiny}", f"hubs: {{huggingface: {repo_id}}}")
    )
    for old, new in (changes or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    specs.mkdir(parents=True, exist_ok=True)
    (specs / f"{name}.yaml").write_text(text)
    return specs


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> StandInHub:
    with StandInHub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        yield h


def test_fetches_only_what_the_engine_needs(hub: StandInHub, tiny_files: dict[str, bytes]) -> None:
    hub.add_repo("OpenGVLab/Tiny", tiny_files)
    lines: list[str] = []
    got = download([("huggingface", "OpenGVLab/Tiny")], notify=lines.append, progress=False)
    names = sorted(str(p.relative_to(got.path)) for p in got.path.rglob("*") if p.is_file())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not {"README.md", "modeling_internvl_chat.py", "training_args.bin"} & set(names)
    assert (got.path / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    assert got.path.is_relative_to(Path(os.environ["HF_HOME"]))
    assert any("fetching" in line for line in lines) and lines[-1].startswith("fetched ")
    code = download([("huggingface", "OpenGVLab/Tiny")], trust_remote_code=True, progress=False)
    assert "modeling_internvl_chat.py" in code.files


def test_revision_is_honoured_for_every_file(hub: StandInHub, tiny_files: dict[str, bytes]) -> None:
    old = hub.add_repo("OpenGVLab/Tiny", {**tiny_files, "config.json": b'{"old": true}'}, branch="v1")
    hub.add_repo("OpenGVLab/Tiny", tiny_files)
    got = download([("huggingface", "OpenGVLab/Tiny")], revision="v1", progress=False)
    assert json.loads((got.path / "config.json").read_text()) == {"old": True}
    resolves = [path for method, path, _ in hub.requests if "/resolve/" in path]
    assert resolves and all(f"/resolve/{old}/" in path for path in resolves)


def test_interrupted_transfer_resumes_with_a_range_request(hub: StandInHub, tiny_files: dict[str, bytes]) -> None:
    big = os.urandom(24 * 2**20)
    hub.add_repo("OpenGVLab/Tiny", {**tiny_files, "model-00002-of-00002.safetensors": big})
    hub.cut_after["model-00002-of-00002.safetensors"] = 12 * 2**20
    got = download([("huggingface", "OpenGVLab/Tiny")], progress=False)
    assert (got.path / "model-00002-of-00002.safetensors").read_bytes() == big
    ranges = hub.file_gets("model-00002-of-00002.safetensors")
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1].split("=")[1].rstrip("-")) > 0


def test_offline_warm_cache_starts_and_cold_cache_names_the_repo(
    hub: StandInHub, tiny_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo("OpenGVLab/Tiny", tiny_files)
    online = download([("huggingface", "OpenGVLab/Tiny")], progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    offline = download([("huggingface", "OpenGVLab/Tiny")], progress=False)
    assert offline.path == online.path and len(hub.requests) == before
    with pytest.raises(DownloadError) as err:
        download([("huggingface", "OpenGVLab/Other"), ("modelscope", "OpenGVLab/Other")], progress=False)
    assert "OpenGVLab/Other" in err.value.message and "HF_HUB_OFFLINE" in (err.value.hint or "")
    assert len(hub.requests) == before


def test_falls_back_to_the_next_source_and_says_so(hub: StandInHub, tiny_files: dict[str, bytes]) -> None:
    hub.add_repo("Mirror/Tiny", tiny_files)
    lines: list[str] = []
    got = download([("huggingface", "Gone/Tiny"), ("huggingface", "Mirror/Tiny")], notify=lines.append, progress=False)
    assert got.repo_id == "Mirror/Tiny" and got.notes
    assert any("Gone/Tiny failed" in line and "trying huggingface: Mirror/Tiny" in line for line in lines)


def test_missing_repo_and_revision(hub: StandInHub, tiny_files: dict[str, bytes]) -> None:
    hub.add_repo("OpenGVLab/Tiny", tiny_files)
    with pytest.raises(DownloadError, match="not found"):
        download([("huggingface", "OpenGVLab/Nope")], progress=False)
    with pytest.raises(DownloadError, match="Revision 'nope'"):
        download([("huggingface", "OpenGVLab/Tiny")], revision="nope", progress=False)


def test_pickle_only_repositories_fetch_their_weight_pickles_and_nothing_else() -> None:
    names = ["config.json", "pytorch_model.bin", "tokenizer.json", "training_args.bin", "optimizer.pt"]
    assert select_files(names) == ["config.json", "pytorch_model.bin", "tokenizer.json"]
    sharded = [
        "config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "rng_state.pth",
    ]
    assert select_files(sharded) == sharded[:4]
    # Training pickles only when allowed; never beside safetensors.
    assert "training_args.bin" in select_files(names, allow_pickle=True)
    assert "optimizer.pt" in select_files(names, allow_pickle=True)
    assert "pytorch_model.bin" not in select_files([*names, "model.safetensors"])
    assert "pytorch_model.bin" not in select_files([*names, "model.safetensors"], allow_pickle=True)
    with pytest.raises(DownloadError, match="no weight files") as err:
        select_files(["config.json", "training_args.bin"])
    assert "--allow-pickle" in err.value.message
    with pytest.raises(DownloadError, match="no weight files"):
        select_files(["config.json"])


def test_a_pickle_only_repository_downloads_with_a_note(hub: StandInHub, tiny_files: dict[str, bytes]) -> None:
    files = {k: v for k, v in tiny_files.items() if not k.endswith(".safetensors")}
    files["pytorch_model.bin"] = b"\x80\x04weights"
    hub.add_repo("OpenGVLab/Pickled", files)
    lines: list[str] = []
    got = download([("huggingface", "OpenGVLab/Pickled")], notify=lines.append, progress=False)
    assert "pytorch_model.bin" in got.files and "training_args.bin" not in got.files
    assert (got.path / "pytorch_model.bin").read_bytes() == files["pytorch_model.bin"]
    assert not (got.path / "training_args.bin").exists()
    assert any("pickle weights only" in note and "weights_only=True" in note for note in got.notes)
    assert any("pickle weights only" in line for line in lines)


def test_download_command_end_to_end(hub: StandInHub, tiny_files: dict[str, bytes], tmp_path: Path) -> None:
    hub.add_repo("test/tiny-hub", tiny_files)
    specs = hub_spec(tmp_path / "specs", "tiny-hub", "test/tiny-hub")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "internvl_launch", "download", "-n", "tiny-hub", "--specs-dir", str(specs)]
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["hub"] == "huggingface" and data["repo_id"] == "test/tiny-hub" and Path(data["path"]).is_dir()
    assert "fetched" in done.stderr  # plain progress lines when stderr is not a terminal
    missing = subprocess.run([*command, "--revision", "nope"], capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 10 and "Revision 'nope'" in missing.stderr


# --- ModelScope, through the real modelscope client ---------------------------------


@pytest.fixture
def modelscope(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> StandInModelScope:
    with StandInModelScope() as ms:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", ms.url)
        monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
        yield ms


def test_modelscope_download_and_fallback_from_huggingface(
    hub: StandInHub, modelscope: StandInModelScope, tiny_files: dict[str, bytes]
) -> None:
    modelscope.add_repo("OpenGVLab/Tiny", tiny_files)
    got = download([("modelscope", "OpenGVLab/Tiny")], progress=False)
    names = {str(p.relative_to(got.path)) for p in got.path.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not {"README.md", "modeling_internvl_chat.py", "training_args.bin"} & names
    assert (got.path / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    lines: list[str] = []
    fell = download([("huggingface", "OpenGVLab/Tiny"), ("modelscope", "OpenGVLab/Tiny")], notify=lines.append)
    assert fell.hub == "modelscope"
    assert any("huggingface: OpenGVLab/Tiny failed" in ln and "trying modelscope" in ln for ln in lines)
    with pytest.raises(DownloadError, match="ModelScope"):
        download([("modelscope", "OpenGVLab/Missing")], progress=False)
    modelscope.add_repo("OpenGVLab/Tiny", {**tiny_files, "config.json": b'{"old": true}'}, branch="v1")
    pinned = download([("modelscope", "OpenGVLab/Tiny")], revision="v1", progress=False)
    assert json.loads((pinned.path / "config.json").read_text()) == {"old": True}
    assert all("Revision=v1" in q for path, q in modelscope.requests[-3:])


def test_a_failed_write_never_leaves_a_file_marked_complete(
    hub: StandInHub, tiny_files: dict[str, bytes], tmp_path: Path
) -> None:
    """A write that fails mid-file (here the file-size limit, as a full disk
    would) leaves only the client's `.incomplete` blob: no snapshot entry for
    the file; the next run completes it."""
    big = os.urandom(24 * 2**20)
    hub.add_repo("OpenGVLab/Tiny", {**tiny_files, "model-00002-of-00002.safetensors": big})
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))\n"
        "from internvl_launch.hub import download\n"
        "from internvl_launch.errors import DownloadError\n"
        "try:\n"
        "    download([('huggingface', 'OpenGVLab/Tiny')], progress=False)\n"
        "except DownloadError as err:\n"
        "    print(err.message); sys.exit(10)\n"
    )
    failed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert failed.returncode == 10, failed.stderr[-2000:]
    repo = Path(os.environ["HF_HOME"]) / "hub" / "models--OpenGVLab--Tiny"
    assert not list(repo.glob("snapshots/*/model-00002-of-00002.safetensors"))
    assert all(p.stat().st_size < len(big) for p in repo.glob("blobs/*"))
    got = download([("huggingface", "OpenGVLab/Tiny")], progress=False)
    assert (got.path / "model-00002-of-00002.safetensors").read_bytes() == big


def test_an_original_checkpoint_from_the_hub_is_converted_once_per_commit(
    hub: StandInHub,
    tmp_path: Path,
    run_cli,  # type: ignore[no-untyped-def]
) -> None:
    """The headline flow on the Transformers engine: a published
    original-layout repository (here an InternLM2-backbone tiny one) is
    downloaded, converted without its code, cached per commit, and answers."""
    from internvl_launch.checkpoint.tiny_original import TinyOriginalConfig, generate_tiny_original
    from internvl_launch.paths import cache_dir

    original = generate_tiny_original(tmp_path / "orig", TinyOriginalConfig("internlm2"))
    files = {p.name: p.read_bytes() for p in original.iterdir()}
    files["modeling_internvl_chat.py"] = b"raise SystemExit('remote code ran')\n"
    first_commit = hub.add_repo("OpenGVLab/Tiny-Original", files)
    specs = hub_spec(
        tmp_path / "specs",
        "tiny-original",
        "OpenGVLab/Tiny-Original",
        {"layout: native": "layout: original", "arch: qwen2": "arch: internlm2", "internvl2_5": "internlm2-chat"},
    )
    args = ("chat", "-n", "tiny-original", "--specs-dir", str(specs), "hello", "--max-tokens", "3", "--json")
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "Converting" in err and json.loads(out)["completion_tokens"] == 3
    converted = cache_dir() / "converted" / "huggingface--OpenGVLab--Tiny-Original"
    version = f"-v{CONVERTER_VERSION}"
    assert [p.name for p in converted.iterdir()] == [f"{first_commit}{version}"]
    code, again, err = run_cli(*args)
    assert code == 0 and "Converting" not in err and json.loads(again)["answer"] == json.loads(out)["answer"]
    config = json.loads((original / "config.json").read_text())
    config["max_dynamic_patch"] = 6
    second_commit = hub.add_repo("OpenGVLab/Tiny-Original", {**files, "config.json": json.dumps(config).encode()})
    code, _, err = run_cli(*args)
    assert code == 0 and "Converting" in err
    assert sorted(p.name for p in converted.iterdir()) == sorted(
        [f"{first_commit}{version}", f"{second_commit}{version}"]
    )


def test_chat_takes_the_hub_and_revision_flags_as_launch_does(
    hub: StandInHub,
    tiny_files: dict[str, bytes],
    tmp_path: Path,
    run_cli,  # type: ignore[no-untyped-def]
) -> None:
    hub.add_repo("test/tiny-hub", tiny_files)
    specs = str(hub_spec(tmp_path / "specs", "tiny-hub", "test/tiny-hub"))
    code, _, err = run_cli("chat", "-n", "tiny-hub", "--specs-dir", specs, "--hub", "modelscope", "hi")
    assert code == 4 and "not published on modelscope" in err
    code, _, err = run_cli("chat", "-n", "tiny-hub", "--specs-dir", specs, "--revision", "nope", "hi")
    assert code == 10 and "Revision 'nope'" in err
    code, out, err = run_cli("chat", "-n", "tiny-hub", "--specs-dir", specs, "hi", "--max-tokens", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["completion_tokens"] == 2
