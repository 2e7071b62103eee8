"""`internvl convert`: the launcher's original -> native converter as a command."""

from __future__ import annotations

import click

from internvl_launch.cli._options import json_option
from internvl_launch.cli._output import emit_json, note


@click.command("convert")
@click.argument("source", type=click.Path(file_okay=False))
@click.argument("destination", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace a non-empty DESTINATION (only once the new one is complete).")
@click.option("--no-verify", is_flag=True, help="Skip loading the result and running one forward pass.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Also read pickle weights that hold more than tensors, with the full unpickler (runs code).",
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    help="Cast floating-point weights (default: keep the source's).",
)
@json_option
def convert_command(
    source: str,
    destination: str,
    overwrite: bool,
    no_verify: bool,
    allow_pickle: bool,
    dtype: str | None,
    as_json: bool,
) -> None:
    """Convert an original-layout InternVL checkpoint to the Transformers-native layout.

    \b
    SOURCE is an InternVLChatModel checkpoint (config.json with llm_config and
    vision_config, safetensors weights); DESTINATION receives an
    InternVLForConditionalGeneration checkpoint that Transformers and vLLM load
    without remote code. Nothing from SOURCE is executed. DESTINATION is
    written whole or not at all.
    """
    from internvl_launch.checkpoint.convert import convert

    report = convert(
        source,
        destination,
        allow_pickle=allow_pickle,
        dtype=dtype,
        overwrite=overwrite,
        verify=not no_verify,
        notify=None if as_json else (lambda m: note(f"internvl: {m}")),
    )
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(
        f"{report.destination}: {report.backbone} backbone -> {report.native_text_model}, template "
        f"{report.template}, {report.parameters / 1e9:.3f}B parameters, {report.dtype}, "
        f"{len(report.files)} files, {report.seconds:.1f} s" + (", verified" if report.verified else "")
    )
    for what, count in report.mapped.items():
        click.echo(f"  {what}: {count}")
    for line in report.notes:
        click.echo(f"  note: {line}")
