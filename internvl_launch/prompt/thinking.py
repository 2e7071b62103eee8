"""InternVL3.5's thinking mode: the reasoning system prompt that switches it
on, and the split of a reply into its reasoning and its answer.

The model cards (huggingface.co/OpenGVLab/InternVL3_5-8B, section "Thinking
Mode") switch thinking on by setting `model.system_message` to their
`R1_SYSTEM_PROMPT`, the string VLMEvalKit evaluates with (the cards link
open-compass/VLMEvalKit, vlmeval/vlm/internvl/internvl_chat.py, line 38). It
takes the place of the checkpoint's default system message; nothing else in
the prompt changes. The cards' own snippet then assigns `R1_SYSTEMP_PROMPT`,
a typo that raises NameError, and some copies in circulation drop the blank
lines between the paragraphs - the text below is the cards' string, blank
lines included.

The model then writes `<think>` ... `</think>` and the answer after it. The
split follows what vLLM's reasoning parsers return for such models (text
before `</think>` is reasoning) with two choices of ours:

* a reply that does not open with `<think>` is all answer: the model chose not
  to think (InternVL3.5 does that for some tasks, OpenGVLab/InternVL#1125), and
  an answer filed as reasoning would leave `content` empty;
* a reply that opens with `<think>` and never closes it is all reasoning, with
  an empty answer (it was cut off while thinking, usually by max_tokens).

A second thinking block right after the first (`</think>\\n\\n<think>`, which
InternVL3.5 sometimes writes, OpenGVLab/InternVL#1164) is reasoning too; the
blocks are joined by a blank line. Reasoning is stripped of the whitespace
around it, the answer of the whitespace before it.
"""

from __future__ import annotations

from typing import Any

THINK_START = "<think>"
THINK_END = "</think>"

#: The cards' `R1_SYSTEM_PROMPT`, exactly (source in the module docstring).
THINKING_SYSTEM_PROMPT = (
    "You are an AI assistant that rigorously follows this response protocol:\n"
    "\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, "
    "and reason through the problem step-by-step. Enclose this entire thinking process within <think> and "
    "</think> tags.\n"
    "\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. "
    "Separate the answer from the think section with a newline.\n"
    "\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should "
    "be standalone and not reference the thinking section."
)


def supports_thinking(spec: Any) -> bool:
    """Whether the spec's model has a thinking mode (the registry's `thinking`)."""
    return bool(getattr(spec, "thinking", False))


def thinking_unsupported(model: str) -> str:
    """The message for a request that asks a model without thinking to think."""
    return (
        f"Thinking mode is not available for {model}: only models whose spec has `thinking: true` "
        "(InternVL3.5) have one."
    )


def _tag_prefix_held(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _scan(text: str, final: bool) -> tuple[str, str]:
    """(reasoning, answer) of `text`; unless `final`, only what more text can
    no longer change (each is a prefix of what longer text gives)."""
    body = text.lstrip()
    if not final and len(body) < len(THINK_START) and THINK_START.startswith(body):
        return "", ""  # not yet known whether it opens a thinking section
    if not body.startswith(THINK_START):
        return "", text
    rest = body[len(THINK_START) :]
    blocks: list[str] = []
    answer = ""
    while True:
        end = rest.find(THINK_END)
        if end < 0:
            if not final:
                rest = rest[: len(rest) - _tag_prefix_held(rest, THINK_END)]
            blocks.append(rest)
            break
        blocks.append(rest[:end])
        after = rest[end + len(THINK_END) :].lstrip()
        if not final and len(after) < len(THINK_START) and THINK_START.startswith(after):
            break  # the answer, or another thinking block: not yet known
        if after.startswith(THINK_START):
            rest = after[len(THINK_START) :]
            continue
        answer = after
        break
    reasoning = "\n\n".join(b.strip() for b in blocks if b.strip())
    return reasoning, answer


def split_reasoning(text: str) -> tuple[str, str]:
    """A whole reply of thinking mode as (reasoning, answer)."""
    return _scan(text, final=True)


class ReasoningStream:
    """The same split for a reply that arrives in pieces: `feed` each text
    delta and get the (reasoning, answer) deltas it settles, then `finish`.
    Joined, the deltas are exactly `split_reasoning` of the whole text; at
    most a tag's length of text is held back."""

    def __init__(self) -> None:
        self._text = ""
        self._sent = ("", "")

    def _emit(self, final: bool) -> tuple[str, str]:
        reasoning, answer = _scan(self._text, final)
        sent_r, sent_a = self._sent
        self._sent = (reasoning, answer)
        return reasoning[len(sent_r) :], answer[len(sent_a) :]

    def feed(self, delta: str) -> tuple[str, str]:
        self._text += delta
        return self._emit(final=False)

    def finish(self) -> tuple[str, str]:
        return self._emit(final=True)


__all__ = [
    "THINKING_SYSTEM_PROMPT",
    "THINK_END",
    "THINK_START",
    "ReasoningStream",
    "split_reasoning",
    "supports_thinking",
    "thinking_unsupported",
]
