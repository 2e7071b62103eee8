"""The OpenAI chat-completions request, as the server validates it.

Field names and ranges follow OpenAI's API; the few extensions (`max_tiles`,
`num_frames`, `top_k`, `repetition_penalty`, `chat_template_kwargs`) are
optional and named as vLLM and InternVL's own tools name them. Unknown fields
are ignored, as OpenAI clients send fields a server may not know.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

MAX_STOP = 4
MAX_STOP_LEN = 256


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Loose):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None
    max_tiles: int | None = Field(default=None, ge=1, le=256, description="Tiles for this image (extension).")


class VideoURL(_Loose):
    url: str = Field(min_length=1)


class TextPart(_Loose):
    type: Literal["text"]
    text: str


class ImagePart(_Loose):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Loose):
    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatTemplateKwargs(_Loose):
    """vLLM's `chat_template_kwargs`; this server reads `enable_thinking` and
    ignores the rest, as a template ignores variables it does not use."""

    enable_thinking: StrictBool | None = None


class ChatCompletionRequest(_Loose):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(
        default=None, ge=0, le=1000, description="Extension: sample from the k most likely tokens."
    )
    repetition_penalty: float | None = Field(default=None, gt=0, le=10, description="Extension.")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    n: int | None = Field(default=None, ge=1, le=128)
    min_tokens: int | None = Field(default=None, ge=0, description="Extension (vLLM's name); only 0 is supported.")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    user: str | None = None
    max_tiles: int | None = Field(default=None, ge=1, le=256, description="Extension: tiles per image.")
    num_frames: int | None = Field(default=None, ge=1, le=1024, description="Extension: frames sampled per video.")
    chat_template_kwargs: ChatTemplateKwargs | None = Field(
        default=None, description="Extension (vLLM's): `enable_thinking` turns InternVL3.5's thinking mode on or off."
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"stop sequences are at most {MAX_STOP_LEN} characters")
        return [s for s in stops if s]

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (OpenAI's current name) or `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def raw_messages(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]
