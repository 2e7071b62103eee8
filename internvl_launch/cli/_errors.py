"""One mapper from core errors to a message on stderr and an exit code.

Subclasses come before their bases. A traceback is printed only when
INTERNVL_DEBUG is set.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import click

from internvl_launch.errors import (
    CheckpointError,
    ConversationError,
    DownloadError,
    EngineUnavailableError,
    EnvironmentFileError,
    InternVLError,
    InvalidSpecError,
    LaunchError,
    MediaError,
    NoMatchingSpecError,
    NotEnoughMemoryError,
    PlacementError,
    UnknownModelError,
)

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_UNKNOWN_MODEL = 3
EXIT_NO_MATCHING_SPEC = 4
EXIT_ENGINE_UNAVAILABLE = 5
EXIT_NOT_ENOUGH_MEMORY = 6
EXIT_INVALID_SPEC = 7
EXIT_BAD_ENVIRONMENT_FILE = 8
EXIT_BAD_INPUT = 9
EXIT_DOWNLOAD = 10
EXIT_LAUNCH = 11
EXIT_CHECKPOINT = 12
EXIT_PLACEMENT = 13

#: (error class, exit code, what the code means) - the documented table.
EXIT_CODES: tuple[tuple[type[BaseException] | None, int, str], ...] = (
    (None, EXIT_OK, "success"),
    (InternVLError, EXIT_INTERNAL, "unexpected error (set INTERNVL_DEBUG=1 for a traceback)"),
    (None, EXIT_USAGE, "usage error: unknown flag, bad flag value, conflicting flags"),
    (UnknownModelError, EXIT_UNKNOWN_MODEL, "unknown model name"),
    (NoMatchingSpecError, EXIT_NO_MATCHING_SPEC, "the model has no spec with that size, format or quantization"),
    (
        EngineUnavailableError,
        EXIT_ENGINE_UNAVAILABLE,
        "the engine asked for (or every possible engine) cannot run here",
    ),
    (NotEnoughMemoryError, EXIT_NOT_ENOUGH_MEMORY, "the memory estimate does not fit the GPUs or host memory found"),
    (InvalidSpecError, EXIT_INVALID_SPEC, "a spec file is invalid; nothing was launched"),
    (EnvironmentFileError, EXIT_BAD_ENVIRONMENT_FILE, "an --environment file could not be read"),
    (MediaError, EXIT_BAD_INPUT, "an input image, video or messages file is unreadable, corrupt or over a limit"),
    (ConversationError, EXIT_BAD_INPUT, "the conversation (messages) is malformed"),
    (
        DownloadError,
        EXIT_DOWNLOAD,
        "the weights could not be fetched (hub unreachable, not found, offline with a cold cache)",
    ),
    (LaunchError, EXIT_LAUNCH, "the server did not become ready, or a launched server could not be found or stopped"),
    (
        CheckpointError,
        EXIT_CHECKPOINT,
        "a checkpoint directory is not a usable InternVL checkpoint, or converting it failed (nothing written)",
    ),
    (
        PlacementError,
        EXIT_PLACEMENT,
        "the model cannot be placed on the GPUs asked for (more than were found, or a tensor-parallel size "
        "that does not divide its attention or key/value heads)",
    ),
)

_ORDERED = sorted(
    ((cls, code) for cls, code, _ in EXIT_CODES if cls is not None),
    key=lambda pair: -len(pair[0].__mro__),
)


def exit_code_for(error: BaseException) -> int:
    for cls, code in _ORDERED:
        if isinstance(error, cls):
            return code
    return EXIT_INTERNAL


def report(error: InternVLError, *, as_json: bool) -> int:
    """Print `error` (stderr; also stdout as JSON when --json) and return its exit code."""
    code = exit_code_for(error)
    if as_json:
        payload = {**error.to_dict(), "exit_code": code}
        click.echo(json.dumps(payload, ensure_ascii=False, indent=2))
    label = "error" if not isinstance(error, InvalidSpecError) else "invalid spec"
    lines = str(error).splitlines() or [type(error).__name__]
    click.echo(f"{label}: {lines[0]}", err=True)
    for line in lines[1:]:
        click.echo(f"  {line}", err=True)
    if error.hint:
        click.echo(f"hint: {error.hint}", err=True)
    if os.environ.get("INTERNVL_DEBUG"):
        traceback.print_exception(error, file=sys.stderr)
    return code
