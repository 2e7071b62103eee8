"""One error hierarchy for the whole tool.

Core code raises these with fields saying what went wrong, why, and what to run
next. The CLI maps each class to a message and a documented exit code
(`internvl_launch.cli._errors`); the server maps them to OpenAI-shaped bodies.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class InternVLError(Exception):
    """Base class. `message` says what is wrong; `hint` says what to do next."""

    message: str
    hint: str | None = None
    details: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description: the class name, message, hint and details."""
        out: dict[str, object] = {"error": type(self).__name__, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        if self.details:
            out["details"] = self.details
        return out


class UnknownModelError(InternVLError):
    """No family has the requested name or alias."""


class NoMatchingSpecError(InternVLError):
    """The family exists but no spec has the requested size/format/quantization."""


class EngineUnavailableError(InternVLError):
    """The requested (or only possible) engine cannot run this spec here."""


class NotEnoughMemoryError(InternVLError):
    """The memory estimate does not fit the devices that were found."""


class PlacementError(InternVLError):
    """The model cannot be placed on the GPUs asked for: more GPUs than were
    found, or a tensor-parallel size that does not divide its heads."""


@dataclass
class SpecIssue:
    """One problem in a spec file, located as precisely as the parser allows."""

    file: str
    line: int | None
    location: str
    message: str

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        loc = f" {self.location}:" if self.location else ""
        return f"{where}:{loc} {self.message}"


class InvalidSpecError(InternVLError):
    """One or more spec files are malformed; `issues` lists every problem found."""

    def __init__(self, issues: list[SpecIssue], hint: str | None = None) -> None:
        self.issues = issues
        summary = "\n".join(issue.render() for issue in issues)
        super().__init__(message=summary, hint=hint)

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        out["issues"] = [issue.__dict__ for issue in self.issues]
        return out


class EnvironmentFileError(InternVLError):
    """An `--environment` file could not be read as a machine description."""


class MediaError(InternVLError):
    """An image, video or message file given as input cannot be used: unreadable,
    corrupt, of a refused format, or over a size limit. The input's fault."""


class ConversationError(InternVLError):
    """A conversation (OpenAI messages) is malformed: unknown role, content of the
    wrong shape, placeholders that do not match the media given."""


@dataclass
class DownloadError(InternVLError):
    """Weights could not be fetched from any hub. `final` marks failures that
    another hub cannot fix (offline mode, a gated repository, a bad revision)."""

    final: bool = False


class LaunchError(InternVLError):
    """A server did not come up, or a launched server could not be found or stopped."""


class CheckpointError(InternVLError):
    """A checkpoint directory is not a usable InternVL checkpoint (no config,
    missing or corrupt weights, an unsupported layout), or converting it failed.
    Nothing is left half-written."""
