"""Fetch a plan's weights from Hugging Face or ModelScope.

The hubs' own clients do the work (their caches, resume of interrupted files,
progress bars, offline mode); this module decides *which* files an engine needs,
walks the plan's hub order with fallback, and turns every client failure into
one `DownloadError` that names the repository and what to do next.

Files fetched: configs (`*.json`), safetensors weights, tokenizer files and
chat templates. Python files only with `trust_remote_code`. When a repository
has no safetensors, its pickle weights named like weights (`pytorch_model*.bin`,
`model*.bin`, with the `.index.json` of sharded ones) are fetched, with a note:
they are read with `torch.load(weights_only=True)`, which builds tensors only,
and converted to safetensors once. Other pickles (`*.pt`, `*.ckpt`,
`training_args.bin`) only with `allow_pickle`, and only when there are no
safetensors.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl_launch.errors import DownloadError, EngineUnavailableError

CONFIG_PATTERNS = ("*.json", "*.jinja")
TOKENIZER_PATTERNS = ("*.model", "*.tiktoken", "*.txt", "*.vocab")
WEIGHT_PATTERNS = ("*.safetensors",)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
#: Pickle files named like model weights: fetched when there are no safetensors.
PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "model*.bin")
CODE_PATTERNS = ("*.py",)

Notify = Callable[[str], None]


@dataclass(frozen=True)
class Download:
    """Where a repository landed, and how it got there."""

    path: Path
    hub: str
    repo_id: str
    revision: str | None
    files: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "hub": self.hub,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "files": list(self.files),
            "notes": list(self.notes),
        }


def wanted_patterns(*, trust_remote_code: bool = False, allow_pickle: bool = False, pickles: bool = True) -> list[str]:
    """Glob patterns of what an engine may need, for clients that fetch by
    pattern. `pickles=False` leaves the pickle weights out (a first pass that
    must not fetch them beside safetensors)."""
    patterns = [*CONFIG_PATTERNS, *TOKENIZER_PATTERNS, *WEIGHT_PATTERNS]
    if trust_remote_code:
        patterns += CODE_PATTERNS
    if pickles:
        patterns += PICKLE_PATTERNS if allow_pickle else PICKLE_WEIGHT_PATTERNS
    return patterns


def select_files(names: list[str], *, trust_remote_code: bool = False, allow_pickle: bool = False) -> list[str]:
    """The files of a repository listing that an engine needs: the
    safetensors weights when there are any, else the pickle weights
    (`pytorch_model*.bin`, `model*.bin`; every pickle with `allow_pickle`).

    Raises `DownloadError` when there are no weights at all."""
    base = [n for n in names if _matches(n, (*CONFIG_PATTERNS, *TOKENIZER_PATTERNS))]
    safetensors = [n for n in names if _matches(n, WEIGHT_PATTERNS)]
    pickles = [n for n in names if _matches(n, PICKLE_PATTERNS if allow_pickle else PICKLE_WEIGHT_PATTERNS)]
    code = [n for n in names if _matches(n, CODE_PATTERNS)] if trust_remote_code else []
    if safetensors:
        return sorted({*base, *safetensors, *code})
    if pickles:
        return sorted({*base, *pickles, *code})
    others = sorted(n for n in names if _matches(n, PICKLE_PATTERNS))
    raise DownloadError(
        "This repository has no weight files (*.safetensors or pytorch_model*.bin)"
        + (f"; its other pickle files ({', '.join(others[:3])}) are fetched only with --allow-pickle" if others else "")
        + ".",
    )


def pickle_only(files: list[str] | tuple[str, ...]) -> list[str]:
    """The pickle weights of a selection that has no safetensors (else [])."""
    if any(_matches(n, WEIGHT_PATTERNS) for n in files):
        return []
    return sorted(n for n in files if _matches(n, PICKLE_PATTERNS))


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    base = name.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(base, p) for p in patterns)


def hf_cache_dir() -> Path:
    """Hugging Face's cache as its own rules place it, read when called (the
    client reads its variables once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "huggingface" / "hub"


def offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "INTERNVL_OFFLINE")
    )


def download(
    sources: list[tuple[str, str]],
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    notify: Notify | None = None,
    progress: bool | None = None,
) -> Download:
    """Fetch the first of `sources` ((hub, repo_id) pairs, in order) that works.

    A failure on one hub is reported through `notify` and the next hub is
    tried; when all fail, the first hub's error is raised (it is the one the
    user asked for or the spec prefers), with the others in its details."""
    if not sources:
        raise DownloadError("Nothing to download: the plan names no hub.")
    say = notify or (lambda _msg: None)
    show_bars = sys.stderr.isatty() if progress is None else progress
    failures: list[tuple[str, str, DownloadError]] = []
    notes: list[str] = []
    for i, (hub, repo_id) in enumerate(sources):
        fetch = _FETCHERS.get(hub)
        if fetch is None:
            raise DownloadError(f"Unknown hub {hub!r}.", hint="Use huggingface or modelscope.")
        try:
            path, files = fetch(
                repo_id,
                revision=revision,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                say=say,
                show_bars=show_bars,
            )
        except DownloadError as err:
            failures.append((hub, repo_id, err))
            if i + 1 < len(sources) and not err.final:
                nxt_hub, nxt_repo = sources[i + 1]
                line = f"{hub}: {repo_id} failed ({err.message}); trying {nxt_hub}: {nxt_repo}"
                say(line)
                notes.append(line)
                continue
            break
        pickled = pickle_only(files)
        if pickled:
            line = (
                f"{hub}: {repo_id} has pickle weights only ({', '.join(pickled[:3])}); they are read with "
                "torch.load(weights_only=True), which builds tensors only, and converted to safetensors once"
            )
            say(line)
            notes.append(line)
        return Download(path, hub, repo_id, revision, tuple(files), tuple(notes))
    hub, repo_id, first = failures[0]
    if len(failures) > 1:
        first.details["other hubs"] = "; ".join(f"{h}: {r}: {e.message}" for h, r, e in failures[1:])
    raise first


# -- Hugging Face ---------------------------------------------------------------


def _huggingface(
    repo_id: str, *, revision: str | None, trust_remote_code: bool, allow_pickle: bool, say: Notify, show_bars: bool
) -> tuple[Path, list[str]]:
    try:
        import huggingface_hub as hf
        from huggingface_hub import errors as hf_errors
    except ImportError as err:  # pragma: no cover - it ships with transformers
        raise EngineUnavailableError(
            "huggingface_hub is not installed.", hint="pip install 'internvl-launch[hub]'"
        ) from err

    endpoint = os.environ.get("HF_ENDPOINT") or None
    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    if offline():
        try:
            path = hf.snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=wanted_patterns(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle),
                local_files_only=True,
                cache_dir=hf_cache_dir(),
                endpoint=endpoint,
                **_bars(show_bars),
            )
        except (hf_errors.LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
            raise DownloadError(
                f"Offline mode is on and {where} is not in the Hugging Face cache.",
                hint=f"On a machine with access run `internvl download` for it (or "
                f"`huggingface-cli download {repo_id}`) with the same HF_HOME, or unset HF_HUB_OFFLINE.",
                final=True,
            ) from err
        files = sorted(str(p.relative_to(path)) for p in Path(path).rglob("*") if p.is_file())
        return Path(path), select_files(files, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    api = hf.HfApi(endpoint=endpoint)
    try:
        listing = api.list_repo_files(repo_id, revision=revision)
        files = select_files(listing, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        say(f"huggingface: {repo_id}: fetching {len(files)} files")
        path = hf.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=files,
            cache_dir=hf_cache_dir(),
            endpoint=endpoint,
            **_bars(show_bars, say),
        )
    except hf_errors.GatedRepoError as err:
        raise DownloadError(
            f"{repo_id} on Hugging Face is gated.",
            hint="Accept its terms on the model page and log in with `hf auth login` (or set HF_TOKEN).",
            final=True,
        ) from err
    except hf_errors.RepositoryNotFoundError as err:
        raise DownloadError(
            f"{repo_id} was not found on Hugging Face (or it is private).",
            hint="Check the spec's hub id, or log in with `hf auth login` for a private repository.",
        ) from err
    except hf_errors.RevisionNotFoundError as err:
        raise DownloadError(
            f"Revision {revision!r} of {repo_id} was not found on Hugging Face.",
            hint="Check the revision (a branch, tag or commit hash).",
            final=True,
        ) from err
    except hf_errors.HfHubHTTPError as err:
        raise DownloadError(f"Hugging Face answered {_status(err)} for {repo_id}.") from err
    except DownloadError:
        raise
    except OSError as err:
        raise DownloadError(f"Could not fetch {repo_id} from Hugging Face: {_short(err)}.") from err
    except Exception as err:  # network errors of the client's HTTP stack
        if type(err).__module__.startswith(("httpx", "httpcore", "httpx2")):
            raise DownloadError(f"Could not reach Hugging Face for {repo_id}: {_short(err)}.") from err
        raise
    return Path(path), files


def _bars(show: bool, say: Notify | None = None) -> dict[str, Any]:
    if show:
        return {}
    from huggingface_hub.utils import tqdm as hf_tqdm

    return {"tqdm_class": _quiet_tqdm(hf_tqdm, say or (lambda _m: None))}


def _quiet_tqdm(base: Any, say: Notify) -> Any:
    """A tqdm class that draws nothing and reports each finished file as a
    plain line: what logs and CI want instead of carriage-return bars."""

    class PlainProgress(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = 0
            self._total = kwargs.get("total")

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            if self._total:
                say(f"fetched {self._done}/{self._total} files")
            return None

    return PlainProgress


def _status(err: Exception) -> str:
    response = getattr(err, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code else "an error"


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


# -- ModelScope -----------------------------------------------------------------


def _modelscope(
    repo_id: str, *, revision: str | None, trust_remote_code: bool, allow_pickle: bool, say: Notify, show_bars: bool
) -> tuple[Path, list[str]]:
    try:
        from modelscope.hub.snapshot_download import snapshot_download as ms_snapshot
    except ImportError as err:
        raise DownloadError(
            "The modelscope client is not installed.",
            hint="pip install 'internvl-launch[modelscope]', or pass --hub huggingface.",
        ) from err
    say(f"modelscope: {repo_id}: fetching")
    kwargs: dict[str, Any] = {}
    if revision:
        kwargs["revision"] = revision
    if offline():
        kwargs["local_files_only"] = True
    # The client fetches by pattern without a listing first: safetensors first,
    # and the pickle weights only when that found none (never both).
    first = wanted_patterns(trust_remote_code=trust_remote_code, pickles=False)
    try:
        path = Path(ms_snapshot(repo_id, allow_patterns=first, **kwargs))
        if not any(p.is_file() and _matches(p.name, WEIGHT_PATTERNS) for p in path.rglob("*")):
            patterns = wanted_patterns(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
            path = Path(ms_snapshot(repo_id, allow_patterns=patterns, **kwargs))
    except Exception as err:
        if offline():
            raise DownloadError(
                f"Offline mode is on and {repo_id} is not in the ModelScope cache.",
                hint="Run `internvl download --hub modelscope` for it on a machine with access, or unset HF_HUB_OFFLINE.",
                final=True,
            ) from err
        raise DownloadError(f"Could not fetch {repo_id} from ModelScope: {_short(err)}.") from err
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return path, select_files(files, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


_FETCHERS: dict[str, Callable[..., tuple[Path, list[str]]]] = {
    "huggingface": _huggingface,
    "modelscope": _modelscope,
}
