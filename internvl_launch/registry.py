"""The model registry: families and specs read from YAML files.

The types are plain frozen dataclasses so that reading the registry stays cheap
(the light CLI commands must start in a fraction of a second). pydantic
validates them - unknown keys refused - whenever a spec file is new or has
changed; the validated result is cached as JSON keyed by the files' paths,
sizes and modification times, so an unchanged registry costs a `stat` per file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from internvl_launch import __version__
from internvl_launch.errors import InvalidSpecError, SpecIssue, UnknownModelError
from internvl_launch.paths import cache_dir, user_specs_dir

# Bump when the dataclasses below change shape: it invalidates cached registries.
SCHEMA_VERSION = 4

Format = Literal["pytorch", "awq"]
Template = Literal["Hermes-2", "internlm2-chat", "phi3-chat", "internvl2_5", "internvl3_5_gpt_oss"]
LLMArch = Literal["qwen2", "internlm2", "llama", "phi3", "qwen3", "qwen3_moe", "gpt_oss"]
Hub = Literal["huggingface", "modelscope", "builtin", "local"]
Layout = Literal["original", "native"]
WeightFormat = Literal["safetensors", "pickle"]
PixelShuffle = Literal["v1", "v2"]
Ability = Literal["chat", "vision", "video"]

#: Quantizations each format may list. On `pytorch`, `4-bit`/`8-bit` quantize
#: full-precision weights at load time with bitsandbytes; `Int8` names a
#: checkpoint saved already quantized (InternVL-Chat-V1-5-Int8).
QUANTIZATIONS: dict[str, tuple[str, ...]] = {
    "pytorch": ("none", "8-bit", "4-bit", "Int8"),
    "awq": ("Int4",),
}

_FORBID = {"extra": "forbid"}


@dataclass(frozen=True)
class Backbone:
    """The language model inside an InternVL checkpoint: what the engines and
    the memory estimate need to know about it."""

    __pydantic_config__ = _FORBID

    arch: LLMArch
    name: str
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    #: Width and vocabulary: the embeddings and the output head stay in 16-bit
    #: under every quantization, so the memory estimate counts them apart.
    hidden_size: int | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool = False
    #: The language model's own context (its config's max_position_embeddings):
    #: a launch never plans beyond it, whatever the family's context length.
    max_position_embeddings: int | None = None


@dataclass(frozen=True)
class VisionTower:
    """The InternViT encoder: its name, parameter count in billions and
    attention heads (vLLM's tensor parallelism splits them)."""

    __pydantic_config__ = _FORBID

    name: str
    params_b: float
    heads: int | None = None


@dataclass(frozen=True)
class Spec:
    """One downloadable variant of a family: a format, a size, its hub IDs."""

    __pydantic_config__ = _FORBID

    format: Format
    size: float
    quantizations: tuple[str, ...]
    hubs: dict[Hub, str]
    llm: Backbone
    vision: VisionTower
    template: Template
    system_message: str
    stop: tuple[str, ...]
    max_tiles: int = 12
    revision: str | None = None
    layout: Layout = "original"
    #: How the repository stores its weights: `pickle` repositories ship only
    #: `pytorch_model*.bin` files, which are turned into safetensors once.
    weights: WeightFormat = "safetensors"
    #: The original model's pixel shuffle: `v1` (InternVL 1.5) leaves each tile's
    #: token grid transposed, which only the checkpoint's own code computes.
    pixel_shuffle: PixelShuffle = "v2"
    #: Native-layout twins of the original repositories (OpenGVLab's `-hf`/`-HF`
    #: repositories): preferred when present, since they need no conversion.
    native_hubs: dict[Hub, str] = field(default_factory=dict)
    #: The model has a thinking mode (InternVL3.5: a reasoning system prompt,
    #: reasoning between <think> tags).
    thinking: bool = False

    @property
    def size_label(self) -> str:
        """The size as people write it: `8`, `0.5`."""
        return format_size(self.size)

    def repo_id(self, hub: str, quantization: str) -> str:
        """The repository on `hub`, with `{quantization}` expanded."""
        return self.hubs[hub].replace("{quantization}", quantization)  # type: ignore[index]


@dataclass(frozen=True)
class Family:
    """A model family (`internvl2`): what it is and the specs it offers."""

    __pydantic_config__ = _FORBID

    name: str
    description: str
    languages: tuple[str, ...]
    abilities: tuple[Ability, ...]
    context_length: int
    specs: tuple[Spec, ...]
    aliases: tuple[str, ...] = ()
    overrides_builtin: bool = False

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class Registry:
    """Every family that was loaded, and the file each came from."""

    families: tuple[Family, ...]
    sources: Mapping[str, str] = field(default_factory=dict)

    def find(self, name: str) -> Family | None:
        """The family whose name or alias equals `name` (case-insensitive)."""
        wanted = normalize_name(name)
        for family in self.families:
            if any(normalize_name(n) == wanted for n in family.names()):
                return family
        return None

    def family(self, name: str) -> Family:
        """Like `find`, but raises `UnknownModelError` with suggestions."""
        found = self.find(name)
        if found is not None:
            return found
        choices = {normalize_name(n): f.name for f in self.families for n in f.names()}
        close = difflib.get_close_matches(normalize_name(name), list(choices), n=3, cutoff=0.6)
        suggestions = list(dict.fromkeys(choices[c] for c in close))
        hint = (
            f"Did you mean {', '.join(repr(s) for s in suggestions)}? " if suggestions else ""
        ) + "Run `internvl list` to see every model."
        raise UnknownModelError(
            f"Unknown model name {name!r}.",
            hint=hint,
            details={"model_name": name, "suggestions": suggestions},
        )


def normalize_name(name: str) -> str:
    return name.strip().lower()


def format_size(size: float) -> str:
    return str(int(size)) if float(size).is_integer() else f"{size:g}"


# ---------------------------------------------------------------- locations


def builtin_specs_dir() -> Path:
    """Where the shipped spec files are: inside the installed package, or the
    repository's `specs/` when running from a checkout."""
    packaged = Path(__file__).parent / "_specs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "specs"


def overlay_dirs(extra: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """User spec directories, in order: `INTERNVL_SPECS_PATH` entries, then
    `--specs-dir` arguments, then the directory `internvl register` writes to."""
    dirs: list[Path] = []
    env = os.environ.get("INTERNVL_SPECS_PATH", "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += [Path(p) for p in extra]
    user = user_specs_dir()
    if user.is_dir():
        dirs.append(user)
    return dirs


def spec_files(directory: Path) -> list[Path]:
    """The spec files of one directory (or the file itself), sorted."""
    if directory.is_file():
        return [directory]
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()), key=lambda p: p.stem
    )


# ---------------------------------------------------------------- loading


def load_registry(specs_dirs: Sequence[str | os.PathLike[str]] = (), *, use_cache: bool = True) -> Registry:
    """Load the built-in families plus the user's overlays.

    A user family with a built-in name replaces the built-in one only when it
    says `overrides_builtin: true`; any other clash of names or aliases is an
    `InvalidSpecError` naming both files. Nothing is returned unless every file
    is valid.
    """
    for d in specs_dirs:
        if not Path(d).exists():
            raise InvalidSpecError(
                [SpecIssue(str(d), None, "", "no such file or directory")],
                hint="Pass an existing directory of *.yaml spec files to --specs-dir.",
            )
    builtin = spec_files(builtin_specs_dir())
    overlays = [f for d in overlay_dirs(specs_dirs) for f in spec_files(d)]
    files = [(f, True) for f in builtin] + [(f, False) for f in overlays]

    key = _cache_key(files)
    cache_file = cache_dir() / "registry" / f"{key}.json"
    if use_cache:
        cached = _read_cache(cache_file)
        if cached is not None:
            return cached

    registry = _merge(_validate_all(files, hint="Fix the spec files above; nothing was launched."))
    if use_cache:
        _write_cache(cache_file, registry)
    return registry


def check_addition(family: Family, source: str, *, replacing: Path | None = None) -> tuple[Registry, bool]:
    """The registry as it would be with `family` (from `source`) added to the
    user's overlays, `replacing` left out, and whether `family` replaces a
    built-in one: raises `InvalidSpecError` on a name or alias clash, exactly
    as loading would."""
    builtin = spec_files(builtin_specs_dir())
    overlays = [f for d in overlay_dirs() for f in spec_files(d) if replacing is None or f != replacing]
    files = [(f, True) for f in builtin] + [(f, False) for f in overlays]
    loaded = _validate_all(files, hint="Fix the spec files above first.")
    registry = _merge([*loaded, (family, source, False)])
    name = normalize_name(family.name)
    return registry, any(is_builtin and normalize_name(f.name) == name for f, _, is_builtin in loaded)


def _validate_all(files: list[tuple[Path, bool]], *, hint: str) -> list[tuple[Family, str, bool]]:
    """Every file validated: (family, file, is built-in) for each, or one
    `InvalidSpecError` listing every problem in every file."""
    loaded: list[tuple[Family, str, bool]] = []
    issues: list[SpecIssue] = []
    for path, is_builtin in files:
        family, file_issues = validate_file(path)
        issues += file_issues
        if family is not None:
            loaded.append((family, str(path), is_builtin))
    if issues:
        raise InvalidSpecError(issues, hint=hint)
    return loaded


def _merge(loaded: list[tuple[Family, str, bool]]) -> Registry:
    by_name: dict[str, tuple[Family, str, bool]] = {}
    issues: list[SpecIssue] = []
    for family, source, is_builtin in loaded:
        key = normalize_name(family.name)
        previous = by_name.get(key)
        if previous is None:
            by_name[key] = (family, source, is_builtin)
            continue
        _, prev_source, prev_builtin = previous
        if prev_builtin and not is_builtin and family.overrides_builtin:
            by_name[key] = (family, source, is_builtin)
            continue
        why = f"family {family.name!r} is already defined by {prev_source}" + (
            "; to replace the built-in family add `overrides_builtin: true`, or choose another name"
            if prev_builtin
            else "; family names must be unique across spec directories"
        )
        issues.append(SpecIssue(source, None, "name", why))
    # Aliases must not collide with another family's name or alias.
    owner: dict[str, str] = {}
    for family, source, _ in by_name.values():
        for n in family.names():
            k = normalize_name(n)
            if k in owner and owner[k] != family.name:
                issues.append(
                    SpecIssue(source, None, "aliases", f"{n!r} is already a name or alias of family {owner[k]!r}")
                )
            owner.setdefault(k, family.name)
    if issues:
        raise InvalidSpecError(issues, hint="Rename the clashing family or alias.")
    families = tuple(f for f, _, _ in by_name.values())
    return Registry(families=families, sources={f.name: s for f, s, _ in by_name.values()})


def validate_file(path: Path) -> tuple[Family | None, list[SpecIssue]]:
    """Parse and validate one spec file. Returns the family, or every issue
    found, each located as `file:line: location: message`."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [SpecIssue(str(path), None, "", f"cannot read file: {exc.__class__.__name__}")]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        return None, [SpecIssue(str(path), line, "", f"invalid YAML: {problem}")]
    if not isinstance(data, dict):
        return None, [SpecIssue(str(path), 1, "", "expected a mapping with `name`, `specs`, ...")]
    # `x-...` keys hold YAML anchors for reuse; they are not part of the schema.
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}

    from pydantic import TypeAdapter, ValidationError

    try:
        family = TypeAdapter(Family).validate_python(data)
    except ValidationError as exc:
        root = _compose(text)
        issues = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            issues.append(SpecIssue(str(path), _line_of(root, loc), _format_loc(loc), _message(err)))
        return None, issues
    issues = [
        SpecIssue(str(path), _line_of(_compose(text), loc), _format_loc(loc), msg)
        for loc, msg in semantic_issues(family)
    ]
    return (None, issues) if issues else (family, [])


def semantic_issues(family: Family) -> list[tuple[tuple[str | int, ...], str]]:
    """Rules a schema cannot express: returns (location, message) pairs."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", family.name):
        out.append((("name",), "use letters, digits, '.', '_' and '-' only"))
    if family.context_length <= 0:
        out.append((("context_length",), "must be positive"))
    if not family.specs:
        out.append((("specs",), "a family needs at least one spec"))
    seen: dict[tuple[str, float, str], int] = {}
    for i, spec in enumerate(family.specs):
        at: tuple[str | int, ...] = ("specs", i)
        if spec.size <= 0:
            out.append(((*at, "size"), "must be a positive number of billions"))
        if not spec.quantizations:
            out.append(((*at, "quantizations"), "list at least one quantization"))
        for q in spec.quantizations:
            allowed = QUANTIZATIONS[spec.format]
            if q not in allowed:
                out.append(
                    (
                        (*at, "quantizations"),
                        f"{q!r} is not a {spec.format} quantization; use one of {', '.join(allowed)}",
                    )
                )
            key = (spec.format, spec.size, q)
            if key in seen:
                out.append(((*at,), f"duplicates spec {seen[key]} ({spec.format}, {spec.size_label}B, {q})"))
            seen[key] = i
        if not spec.hubs:
            out.append(((*at, "hubs"), "name at least one hub"))
        if "builtin" in spec.hubs and len(spec.hubs) > 1:
            out.append(((*at, "hubs"), "a builtin spec has no other hubs"))
        if "local" in spec.hubs:
            where = spec.hubs["local"]
            if len(spec.hubs) > 1:
                out.append(((*at, "hubs"), "a local spec has no other hubs"))
            if not (where.startswith(("/", "~")) or re.match(r"[A-Za-z]:[\\/]", where)):
                out.append(((*at, "hubs", "local"), "give an absolute path (or one starting with ~)"))
        for hub in spec.native_hubs:
            if hub not in ("huggingface", "modelscope"):
                out.append(
                    ((*at, "native_hubs"), f"{hub!r}: native twins are hub repositories (huggingface, modelscope)")
                )
        if spec.native_hubs and spec.layout != "original":
            out.append(((*at, "native_hubs"), "only an original-layout spec has native twins"))
        if spec.native_hubs and spec.format != "pytorch":
            out.append(((*at, "native_hubs"), "OpenGVLab's native twins are full-precision (format pytorch)"))
        llm = spec.llm
        if min(llm.layers, llm.attention_heads, llm.kv_heads, llm.head_dim) <= 0:
            out.append(((*at, "llm"), "layers, attention_heads, kv_heads and head_dim must be positive"))
        elif llm.attention_heads % llm.kv_heads:
            out.append(((*at, "llm", "kv_heads"), "must divide attention_heads"))
        for name in ("hidden_size", "vocab_size", "max_position_embeddings"):
            value = getattr(llm, name)
            if value is not None and value <= 0:
                out.append(((*at, "llm", name), "must be positive"))
        if spec.vision.params_b <= 0:
            out.append(((*at, "vision", "params_b"), "must be a positive number of billions"))
        if spec.vision.heads is not None and spec.vision.heads <= 0:
            out.append(((*at, "vision", "heads"), "must be positive"))
        if not 1 <= spec.max_tiles <= 40:
            out.append(((*at, "max_tiles"), "must be between 1 and 40"))
        if not spec.stop:
            out.append(((*at, "stop"), "list at least one stop token"))
    return out


def _message(err: Mapping[str, Any]) -> str:
    if err["type"] == "unexpected_keyword_argument":
        return "unknown key (check its spelling; see docs/registry.md for the keys)"
    if err["type"] in ("missing", "missing_argument"):
        return "required key is missing"
    return str(err["msg"])


def _format_loc(loc: Iterable[object]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _compose(text: str) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.compose(text, Loader=loader)
    except yaml.YAMLError:
        return None


def _line_of(node: Any, loc: Sequence[object]) -> int | None:
    """The 1-based line of the YAML node at `loc`, or of its nearest parent."""
    import yaml

    if node is None:
        return None
    line: int = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                return line
            key_node, node = match
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# ---------------------------------------------------------------- cache


def _cache_key(files: Sequence[tuple[Path, bool]]) -> str:
    parts = [f"{__version__}:{SCHEMA_VERSION}"]
    for path, is_builtin in files:
        try:
            st = path.stat()
        except OSError:
            continue
        parts.append(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{is_builtin}")
    text = "\n".join(parts).encode()
    # Not a security boundary: the key only tells whether the files changed.
    return f"{zlib.crc32(text):08x}{zlib.adler32(text):08x}{len(text):x}"


def _read_cache(path: Path) -> Registry | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Registry(
            families=tuple(_family_from_dict(f) for f in raw["families"]),
            sources=raw["sources"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, registry: Registry) -> None:
    payload = {
        "families": [dataclasses.asdict(f) for f in registry.families],
        "sources": dict(registry.sources),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs speed


def _family_from_dict(d: dict[str, Any]) -> Family:
    specs = tuple(
        Spec(
            **{
                **s,
                "quantizations": tuple(s["quantizations"]),
                "stop": tuple(s["stop"]),
                "llm": Backbone(**s["llm"]),
                "vision": VisionTower(**s["vision"]),
            }
        )
        for s in d["specs"]
    )
    return Family(
        **{
            **d,
            "languages": tuple(d["languages"]),
            "abilities": tuple(d["abilities"]),
            "aliases": tuple(d["aliases"]),
            "specs": specs,
        }
    )
