"""From a plan to a directory of weights an engine can load: a local path the
user gave, the built-in tiny model, or a hub download; then the layout check
(original-layout checkpoints need conversion to the native one)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from internvl_launch.errors import CheckpointError, EngineUnavailableError
from internvl_launch.hub import Download, Notify, download
from internvl_launch.resolver import LaunchPlan

NATIVE_ARCHITECTURES = ("InternVLForConditionalGeneration",)
ORIGINAL_ARCHITECTURES = ("InternVLChatModel",)


def checkpoint_layout(path: Path) -> str:
    """`native` or `original`, from the checkpoint's config.json."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} has no readable config.json.", hint="Point at a checkpoint directory.") from err
    archs = config.get("architectures") or []
    if any(a in NATIVE_ARCHITECTURES for a in archs):
        return "native"
    if any(a in ORIGINAL_ARCHITECTURES for a in archs) or "llm_config" in config:
        return "original"
    raise CheckpointError(
        f"{path} is not an InternVL checkpoint: its config names {archs or 'no architecture'}.",
        hint="Expected InternVLForConditionalGeneration (native) or InternVLChatModel (original).",
    )


def _refuse_pixel_shuffle_v1_on_vllm(path: Path, layout: str) -> None:
    """vLLM's native InternVL computes pixel shuffle v2 only: a v1 checkpoint
    (an original one whose ps_version is v1 or absent, or one converted from
    it) would run with each tile's image tokens transposed."""
    from internvl_launch.engines.pixel_shuffle import pixel_shuffle_version

    config = json.loads((path / "config.json").read_text())
    if layout == "original":
        v1 = config.get("ps_version", "v1") == "v1"
    else:
        v1 = pixel_shuffle_version(config) == "v1"
    if v1:
        raise EngineUnavailableError(
            f"{path} uses pixel shuffle v1 (InternVL 1.5), which vLLM computes only with the checkpoint's own "
            "code; its native InternVL would see each tile transposed.",
            hint="Serve the original checkpoint with --model-engine vllm --trust-remote-code, "
            "or use --model-engine transformers.",
        )


def fetch_weights(
    plan: LaunchPlan, *, trust_remote_code: bool = False, allow_pickle: bool = False, notify: Notify | None = None
) -> Download:
    """The plan's weights on this machine: the built-in tiny model (generated
    on first use), a local directory, or a download through the plan's hubs in order."""
    if plan.hub == "local":
        path = Path(plan.repo_id).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a directory.", hint="Check the path the spec or --model-path names.")
        files = tuple(sorted(p.name for p in path.iterdir() if p.is_file()))
        return Download(path, "local", plan.repo_id, None, files)
    if plan.hub == "builtin":
        from internvl_launch.checkpoint.tiny import tiny_checkpoint

        path = tiny_checkpoint()
        files = tuple(sorted(str(p.relative_to(path)) for p in path.iterdir() if p.is_file()))
        return Download(path, "builtin", plan.repo_id, None, files)
    return download(
        [(plan.hub, plan.repo_id), *plan.fallback],
        revision=plan.revision,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        notify=notify,
    )


def locate_weights(
    plan: LaunchPlan,
    model_path: str | os.PathLike[str] | None = None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    notify: Notify | None = None,
) -> Path:
    """Where the plan's weights are on this machine, fetching them if needed.
    Original-layout checkpoints are converted to the native layout once and
    the conversion is cached (per hub repo and revision, or per local
    directory's contents); vLLM with --trust-remote-code serves them as they are."""
    repo_id: str | None = None
    revision: str | None = None
    if model_path is None and plan.hub == "local":
        model_path = plan.repo_id
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is not a checkpoint directory (no config.json).",
                hint="Point --model-path at the directory that holds config.json and the weights.",
            )
    else:
        fetched = fetch_weights(plan, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, notify=notify)
        path = fetched.path
        if plan.hub == "builtin":
            return path
        repo_id, revision = f"{fetched.hub}/{fetched.repo_id}", fetched.revision
        if fetched.hub == "huggingface" and re.fullmatch(r"[0-9a-f]{40}", path.name):
            revision = path.name  # the snapshot directory is the resolved commit: a new commit converts again
    layout = checkpoint_layout(path)
    if plan.engine == "vllm" and layout == "original" and trust_remote_code:
        return path
    if plan.engine == "vllm":
        _refuse_pixel_shuffle_v1_on_vllm(path, layout)
    if layout == "native":
        return path
    from internvl_launch.checkpoint.convert import cached_conversion

    converted, _cached = cached_conversion(
        path, repo_id=repo_id, revision=revision, allow_pickle=allow_pickle, notify=notify
    )
    return converted
