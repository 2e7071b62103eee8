"""The conversation templates InternVL checkpoints were trained with.

All are "MPT style": the system part, then `role + message + sep` for each
message, ending with the bare assistant role. The strings are the ones the
original `conversation.py` defines for each name; the golden tests pin them.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Special tokens of the image block (section 1 of the facts file).
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
#: What marks an image's place in a seed-style question (`model.chat`).
IMAGE_PLACEHOLDER = "<image>"
#: 448 px tile / 14 px patches = 32 x 32 patches; pixel shuffle at 0.5 leaves 16 x 16.
IMAGE_TOKENS_PER_TILE = 256


@dataclass(frozen=True)
class Template:
    """One conversation format: how the system message, the roles and the
    separator are written, and which token ends the assistant's turn."""

    name: str
    system_template: str  # contains "{system_message}"
    roles: tuple[str, str]  # (user, assistant) prefixes
    sep: str
    #: Special tokens the template itself writes; they are kept as tokens, while
    #: the same text typed in a message is tokenized as plain text.
    special_tokens: tuple[str, ...]
    #: The token that ends the assistant's reply when it is not the separator
    #: (InternVL3.5-GPT-OSS: turns end with `<|end|>`, the reply with `<|return|>`).
    end: str | None = None

    @property
    def stop_token(self) -> str:
        """The token that ends a reply: the separator without whitespace (or
        `end`). The original sets `eos_token_id` to it and cuts the answer there."""
        return self.end or self.sep.strip()

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Stop strings for engines, for tokenizers where the stop token is not
        a single special token (InternVL2-4B's `<|end|>`)."""
        return (self.stop_token,)

    def system_text(self, system_message: str) -> str:
        return self.system_template.format(system_message=system_message)


_CHATML = ("<|im_start|>", "<|im_end|>")

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "Hermes-2",
            "<|im_start|>system\n{system_message}",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"),
            "<|im_end|>",
            _CHATML,
        ),
        Template(
            "internlm2-chat",
            "<|im_start|>system\n{system_message}",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"),
            "<|im_end|>",
            _CHATML,
        ),
        Template(
            "phi3-chat",
            "<|system|>\n{system_message}",
            ("<|user|>\n", "<|assistant|>\n"),
            "<|end|>",
            ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        ),
        Template(
            "internvl2_5",
            "<|im_start|>system\n{system_message}",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"),
            "<|im_end|>\n",
            _CHATML,
        ),
        # InternVL3.5-GPT-OSS: GPT-OSS's harmony markers (OpenGVLab/InternVL
        # internvl_chat_gpt_oss/internvl/model/internvl_chat/conversation.py, MPT_TWO
        # style: earlier turns end with sep, the model's reply with sep2).
        Template(
            "internvl3_5_gpt_oss",
            "<|start|>system<|message|>{system_message}",
            ("<|start|>user<|message|>", "<|start|>assistant"),
            "<|end|>",
            ("<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|channel|>"),
            end="<|return|>",
        ),
    )
}


def get_template(name: str) -> Template:
    """The template called `name`; a KeyError names the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}") from None


_INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
_INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

#: The system message each template uses when a checkpoint names none (a
#: checkpoint's config may carry its own `system_message`, which wins).
DEFAULT_SYSTEM_MESSAGES: dict[str, str] = {
    "Hermes-2": _INTERNVL2_SYSTEM,
    "internlm2-chat": _INTERNVL2_SYSTEM,
    "phi3-chat": _INTERNVL2_SYSTEM,
    "internvl2_5": _INTERNVL2_5_SYSTEM,
    # The same conversation.py's default for internvl3_5_gpt_oss, to the letter.
    "internvl3_5_gpt_oss": (
        "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
        "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every "
        "message."
    ),
}
