"""`internvl list`, `show` and `validate` read the registry; `register` and
`unregister` add and remove the user's own families."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from internvl_launch.cli._errors import EXIT_INVALID_SPEC
from internvl_launch.cli._options import json_option, specs_dir_option
from internvl_launch.cli._output import emit_json, emit_table, note
from internvl_launch.errors import InvalidSpecError, SpecIssue
from internvl_launch.registry import Family, Spec, load_registry, spec_files, validate_file
from internvl_launch.request import RequestError, parse_format
from internvl_launch.resolver import rule_for


def spec_row(family: Family, spec: Spec) -> dict[str, Any]:
    """One spec as JSON-ready data (the row format of `list --json`)."""
    return {
        "model_name": family.name,
        "size_in_billions": spec.size,
        "format": spec.format,
        "quantizations": list(spec.quantizations),
        "engines": {q: list(rule_for(spec.format, q).engines) for q in spec.quantizations},
        "hubs": dict(spec.hubs),
        "native_hubs": dict(spec.native_hubs),
        "thinking": spec.thinking,
        "repo_ids": {q: {hub: spec.repo_id(hub, q) for hub in spec.hubs} for q in spec.quantizations},
        "revision": spec.revision,
        "layout": spec.layout,
        "llm": spec.llm.name,
        "llm_arch": spec.llm.arch,
        "vision": spec.vision.name,
        "template": spec.template,
        "max_tiles": spec.max_tiles,
        "context_length": family.context_length,
    }


def _engines_cell(spec: Spec) -> str:
    engines: list[str] = []
    for q in spec.quantizations:
        for e in rule_for(spec.format, q).engines:
            label = e if all(e in rule_for(spec.format, x).engines for x in spec.quantizations) else f"{e} ({q})"
            if label not in engines:
                engines.append(label)
    return ", ".join(engines)


def _hub_cell(spec: Spec) -> str:
    hub = next(iter(spec.hubs))
    cell = spec.hubs[hub] if hub != "builtin" else "builtin (generated locally)"
    twin = spec.native_hubs.get(hub)  # type: ignore[call-overload]
    return f"{cell} (native: {twin})" if twin else cell


@click.command("list")
@click.option("--model-name", "-n", help="Only this family (name or alias).")
@click.option("--model-format", "-f", "fmt", help="Only this format: pytorch or awq.")
@json_option
@specs_dir_option
def list_command(model_name: str | None, fmt: str | None, as_json: bool, specs_dirs: tuple[str, ...]) -> None:
    """List every model family and spec."""
    registry = load_registry(specs_dirs)
    families = [registry.family(model_name)] if model_name else list(registry.families)
    if fmt:
        try:
            fmt = parse_format(fmt)
        except RequestError as exc:
            raise click.BadParameter(str(exc), param_hint="--model-format") from exc
    rows = [(f, s) for f in families for s in f.specs if fmt is None or s.format == fmt]
    if as_json:
        emit_json([spec_row(f, s) for f, s in rows])
        return
    emit_table(
        ("MODEL", "SIZE", "FORMAT", "QUANTIZATIONS", "ENGINES", "HUB ID"),
        [
            (f.name, f"{s.size_label}B", s.format, ", ".join(s.quantizations), _engines_cell(s), _hub_cell(s))
            for f, s in rows
        ],
    )


@click.command("show")
@click.argument("model_name")
@json_option
@specs_dir_option
def show_command(model_name: str, as_json: bool, specs_dirs: tuple[str, ...]) -> None:
    """Show one family: sizes, formats, quantizations, engines, hub IDs."""
    registry = load_registry(specs_dirs)
    family = registry.family(model_name)
    if as_json:
        emit_json(
            {
                "name": family.name,
                "aliases": list(family.aliases),
                "description": family.description,
                "languages": list(family.languages),
                "abilities": list(family.abilities),
                "context_length": family.context_length,
                "source": registry.sources.get(family.name),
                "specs": [spec_row(family, s) for s in family.specs],
            }
        )
        return
    click.echo(f"{family.name}" + (f"  (aliases: {', '.join(family.aliases)})" if family.aliases else ""))
    click.echo(f"  {family.description}")
    click.echo(f"  languages: {', '.join(family.languages)}   abilities: {', '.join(family.abilities)}")
    click.echo(f"  context length: {family.context_length}")
    click.echo("")
    emit_table(
        ("SIZE", "FORMAT", "QUANTIZATIONS", "ENGINES", "LLM", "VISION", "TEMPLATE", "HUGGING FACE", "MODELSCOPE"),
        [
            (
                f"{s.size_label}B",
                s.format,
                ", ".join(s.quantizations),
                _engines_cell(s),
                s.llm.name,
                s.vision.name,
                s.template,
                _twinned(s, "huggingface") if "huggingface" in s.hubs else s.hubs.get("builtin", "-"),
                _twinned(s, "modelscope") if "modelscope" in s.hubs else "-",
            )
            for s in family.specs
        ],
    )


def _twinned(spec: Spec, hub: str) -> str:
    repo = spec.hubs[hub]  # type: ignore[index]
    twin = spec.native_hubs.get(hub)  # type: ignore[call-overload]
    return f"{repo} (native: {twin})" if twin else repo


@click.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@json_option
def validate_command(paths: tuple[str, ...], as_json: bool) -> None:
    """Check spec files (or directories of them) without launching anything.

    Each problem is printed as FILE:LINE: LOCATION: MESSAGE. The files are also
    checked against the built-in registry for name clashes.
    """
    files: list[Path] = []
    issues: list[SpecIssue] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            issues.append(SpecIssue(p, None, "", "no such file or directory"))
            continue
        found = spec_files(path)
        if not found:
            issues.append(SpecIssue(p, None, "", "no *.yaml or *.yml files here"))
        files += found
    results = []
    for f in files:
        family, file_issues = validate_file(f)
        issues += file_issues
        results.append(
            {"file": str(f), "family": family.name if family else None, "specs": len(family.specs) if family else 0}
        )
    if not issues:
        try:  # clashes with the built-ins and between the files
            load_registry(paths, use_cache=False)
        except InvalidSpecError as exc:
            issues += exc.issues
    if as_json:
        emit_json({"valid": not issues, "files": results, "issues": [i.__dict__ for i in issues]})
    else:
        for r in results:
            if r["family"]:
                click.echo(f"{r['file']}: ok ({r['family']}, {r['specs']} specs)")
        for issue in issues:
            click.echo(issue.render(), err=True)
    if issues:
        if not as_json:
            note(f"{len(issues)} problem(s) found; nothing was launched.")
        raise click.exceptions.Exit(EXIT_INVALID_SPEC)


@click.command("register")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--replace", is_flag=True, help="Replace an earlier registration of the same family.")
@json_option
def register_command(path: str, replace: bool, as_json: bool) -> None:
    """Add a family from a spec file to your registry.

    \b
    The file is validated (as `internvl validate` does), local checkpoint
    paths it names are checked, and it is copied into your spec directory,
    which every command reads. A built-in name is replaced only when the file
    says `overrides_builtin: true`.
    """
    import os
    import tempfile

    from internvl_launch.checkpoint.local import describe_checkpoint
    from internvl_launch.paths import user_specs_dir
    from internvl_launch.registry import check_addition

    source = Path(path)
    if not source.is_file():
        raise InvalidSpecError([SpecIssue(path, None, "", "no such file")], hint="Give the path of a *.yaml spec file.")
    family, issues = validate_file(source)
    if family is None:
        raise InvalidSpecError(issues, hint="Fix the spec file; nothing was registered.")
    for spec in family.specs:
        if "local" in spec.hubs:
            describe_checkpoint(os.path.expanduser(spec.hubs["local"]))
    target_dir = user_specs_dir()
    target = target_dir / f"{family.name}.yaml"
    if target.exists() and not replace:
        raise InvalidSpecError(
            [SpecIssue(str(source), None, "name", f"{family.name!r} is already registered ({target})")],
            hint="Pass --replace to replace it, or `internvl unregister` it first.",
        )
    registry, replaces_builtin = check_addition(family, str(source), replacing=target if target.exists() else None)
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{family.name}.", suffix=".tmp", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(source.read_bytes())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    result = {
        "registered": family.name,
        "file": str(target),
        "specs": len(family.specs),
        "replaces_builtin": replaces_builtin,
        "families": len(registry.families),
    }
    if as_json:
        emit_json(result)
        return
    click.echo(f"registered {family.name} ({len(family.specs)} specs): {target}")
    if replaces_builtin:
        note(f"internvl: {family.name} replaces the built-in family of that name (overrides_builtin: true).")


@click.command("unregister")
@click.argument("name")
@json_option
def unregister_command(name: str, as_json: bool) -> None:
    """Remove a family that `internvl register` added."""
    from internvl_launch.errors import UnknownModelError
    from internvl_launch.paths import user_specs_dir
    from internvl_launch.registry import normalize_name

    wanted = normalize_name(name)
    registered: list[str] = []
    for path in spec_files(user_specs_dir()):
        family, _ = validate_file(path)
        if family is None:
            continue
        registered.append(family.name)
        if any(normalize_name(n) == wanted for n in family.names()):
            path.unlink()
            if as_json:
                emit_json({"unregistered": family.name, "file": str(path)})
            else:
                click.echo(f"unregistered {family.name}: removed {path}")
            return
    found = load_registry().find(name)
    if found is not None:
        source = load_registry().sources.get(found.name, "")
        raise UnknownModelError(
            f"{found.name} was not added by `internvl register`; it comes from {source}.",
            hint="Built-in families cannot be unregistered; remove other spec files where they are.",
        )
    raise UnknownModelError(
        f"No registered family is called {name!r}.",
        hint=f"Registered: {', '.join(registered)}." if registered else "Nothing is registered.",
    )
