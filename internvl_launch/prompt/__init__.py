"""Prompts: InternVL's conversation templates, OpenAI messages to the exact
prompt string, image placeholder expansion and stop strings, and InternVL3.5's
thinking mode (its system prompt, the reasoning/answer split)."""

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
from internvl_launch.prompt.thinking import (
    THINKING_SYSTEM_PROMPT,
    ReasoningStream,
    split_reasoning,
    supports_thinking,
    thinking_unsupported,
)

__all__ = [
    "TEMPLATES",
    "THINKING_SYSTEM_PROMPT",
    "Media",
    "Message",
    "Piece",
    "Prompt",
    "ReasoningStream",
    "Template",
    "build_prompt",
    "conversation_media",
    "get_template",
    "parse_messages",
    "split_reasoning",
    "supports_thinking",
    "thinking_unsupported",
]
