"""The four conversation templates InternVL checkpoints were trained with.

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

    @property
    def stop_token(self) -> str:
        """The token that ends a reply: the separator without whitespace. The
        original sets `eos_token_id` to it and cuts the answer there."""
        return self.sep.strip()

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
    )
}


def get_template(name: str) -> Template:
    """The template called `name`; a KeyError names the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}") from None
