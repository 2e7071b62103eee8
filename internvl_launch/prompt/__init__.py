"""Prompts: InternVL's conversation templates, OpenAI messages to the exact
prompt string, image placeholder expansion and stop strings."""

from internvl_launch.prompt.conversation import (
    Media,
    Message,
    Piece,
    Prompt,
    build_prompt,
    conversation_media,
    parse_messages,
)
from internvl_launch.prompt.templates import TEMPLATES, Template, get_template

__all__ = [
    "TEMPLATES",
    "Media",
    "Message",
    "Piece",
    "Prompt",
    "Template",
    "build_prompt",
    "conversation_media",
    "get_template",
    "parse_messages",
]
