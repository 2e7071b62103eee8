"""Conversations to prompts: OpenAI messages in, the exact InternVL prompt out.

A prompt is kept as pieces - template text, message text, image blocks -
rather than one string, so that tokenization can tell them apart: the special
tokens the template writes stay special tokens, while the same characters typed
in a message (`<|im_end|>`, `<img>`, `<IMG_CONTEXT>`, `<image>`) are tokenized
as the plain text they are. Joined, the pieces are the prompt string the
original `chat()` would build.

Where images go (the original's rules, applied to OpenAI messages):

* Each image becomes `<img>` + `<IMG_CONTEXT>` x 256 x tiles + `</img>`.
* The media of a user message go before its text, in the order given, one
  per line: `<image>\\n` when the whole conversation has one image,
  `Image-1: <image>\\nImage-2: <image>\\n...` (numbered across the
  conversation) when it has several, and `Frame1: <image>\\n...` for the
  frames of a video. The text parts follow, joined by newlines.
* Seed-style questions (`model.chat(question, pixel_values)`, the Python API)
  may mark places with `<image>` themselves; when no message does, `<image>\\n`
  is prepended to the first user message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from internvl_launch.errors import ConversationError
from internvl_launch.prompt.templates import (
    IMAGE_PLACEHOLDER,
    IMAGE_TOKENS_PER_TILE,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    Template,
)
from internvl_launch.prompt.thinking import THINKING_SYSTEM_PROMPT

Role = Literal["system", "user", "assistant"]
MediaKind = Literal["image", "video"]


@dataclass(frozen=True)
class Media:
    """An image or a video in a message, as the client gave it: a URL, a data
    URL, a path, bytes, or an already decoded image."""

    kind: MediaKind
    source: Any
    detail: str | None = None  # OpenAI's image detail: low, high or auto
    max_tiles: int | None = None  # a per-image tile limit (extension)


@dataclass(frozen=True)
class Message:
    """One message: a role and its parts (text and media) in order."""

    role: Role
    parts: tuple[str | Media, ...]

    @property
    def text(self) -> str:
        return "\n".join(p for p in self.parts if isinstance(p, str))

    @property
    def media(self) -> tuple[Media, ...]:
        return tuple(p for p in self.parts if isinstance(p, Media))


@dataclass(frozen=True)
class Piece:
    """A run of prompt text. `kind` says how it becomes token ids: `text` is
    tokenized with special tokens disabled, `special` is one special token,
    `image` is one image block of `tiles` tiles."""

    kind: Literal["text", "special", "image"]
    text: str = ""
    tiles: int = 0


@dataclass(frozen=True)
class Prompt:
    """A built prompt: its pieces, the tiles of each image block in order, and
    the strings that end the reply."""

    pieces: tuple[Piece, ...]
    stop: tuple[str, ...]
    image_tokens_per_tile: int = IMAGE_TOKENS_PER_TILE

    @property
    def image_blocks(self) -> tuple[int, ...]:
        return tuple(p.tiles for p in self.pieces if p.kind == "image")

    @property
    def num_image_tokens(self) -> int:
        """Tokens the image blocks take, `<img>` and `</img>` included."""
        return sum(self.image_tokens_per_tile * t + 2 for t in self.image_blocks)

    @property
    def text(self) -> str:
        """The exact prompt string, image blocks expanded."""
        return self.render()

    def render(self, compact: bool = False) -> str:
        """The prompt string; `compact` writes each image block's context
        tokens as `<IMG_CONTEXT>*N` instead of N copies."""
        out = []
        for p in self.pieces:
            if p.kind == "image":
                n = self.image_tokens_per_tile * p.tiles
                body = f"{IMG_CONTEXT}*{n}" if compact else IMG_CONTEXT * n
                out.append(f"{IMG_START}{body}{IMG_END}")
            else:
                out.append(p.text)
        return "".join(out)

    def encode(self, tokenizer: Any, vocab: Mapping[str, int] | None = None) -> list[int]:
        """Token ids as the original tokenizes the prompt string (the
        tokenizer's own prefix such as BOS included), except that special
        tokens typed in messages stay text. `vocab` is `tokenizer.get_vocab()`,
        which callers encoding many prompts should fetch once."""
        ids = list(_prefix_ids(tokenizer))
        vocab = vocab if vocab is not None else tokenizer.get_vocab()
        for p in self.pieces:
            if p.kind == "text":
                ids += tokenizer(p.text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            elif p.kind == "special":
                if p.text in vocab:
                    ids.append(vocab[p.text])
                else:  # a template token this tokenizer does not have: it is text to it
                    ids += tokenizer(p.text, add_special_tokens=False)["input_ids"]
            else:
                n = self.image_tokens_per_tile * p.tiles
                ids += [vocab[IMG_START], *([vocab[IMG_CONTEXT]] * n), vocab[IMG_END]]
        return ids


def _prefix_ids(tokenizer: Any) -> list[int]:
    """What the tokenizer adds in front of a text of its own (BOS for
    InternLM2 and Llama tokenizers, nothing for Qwen2)."""
    cached = getattr(tokenizer, "_internvl_prefix_ids", None)
    if cached is not None:
        return cached
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    prefix = full[: full.index(bare[0])] if bare and bare[0] in full else []
    try:
        tokenizer._internvl_prefix_ids = prefix
    except AttributeError:
        pass
    return prefix


class _Builder:
    def __init__(self, template: Template) -> None:
        self.pieces: list[Piece] = []
        self.written = 0  # pieces appended or extended so far
        names = sorted(template.special_tokens, key=len, reverse=True)
        self._special = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    def trusted(self, text: str) -> None:
        """Template text: its special tokens become special pieces."""
        for i, part in enumerate(self._special.split(text)):
            if not part:
                continue
            if i % 2:
                self.written += 1
                self.pieces.append(Piece("special", part))
            else:
                self.literal(part)

    def literal(self, text: str) -> None:
        """Message text: never special, whatever it contains."""
        if not text:
            return
        self.written += 1
        if self.pieces and self.pieces[-1].kind == "text":
            self.pieces[-1] = Piece("text", self.pieces[-1].text + text)
        else:
            self.pieces.append(Piece("text", text))

    def image(self, tiles: int) -> None:
        self.written += 1
        self.pieces.append(Piece("image", tiles=tiles))


def parse_messages(raw: Any) -> list[Message]:
    """OpenAI chat messages (dicts) to `Message`s; anything malformed raises
    `ConversationError` naming the message and the field."""
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise ConversationError("`messages` must be a list of message objects.")
    if not raw:
        raise ConversationError("`messages` is empty; give at least one user message.")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise ConversationError(f"{where} must be an object with `role` and `content`.")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ConversationError(
                f"{where}.role is {role!r}; supported roles are system, developer, user and assistant."
            )
        out.append(Message(role, _parse_content(m.get("content"), where, role)))
    return out


def _parse_content(content: Any, where: str, role: str) -> tuple[str | Media, ...]:
    if content is None:
        if role == "assistant":
            return ()
        raise ConversationError(f"{where}.content is missing.")
    if isinstance(content, str):
        return (content,)
    if not isinstance(content, Sequence):
        raise ConversationError(f"{where}.content must be a string or a list of parts.")
    parts: list[str | Media] = []
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        if not isinstance(part, Mapping):
            raise ConversationError(f"{pw} must be an object with a `type`.")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ConversationError(f"{pw}.text must be a string.")
            parts.append(text)
        elif kind in ("image_url", "video_url"):
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, Mapping) else ref
            if not isinstance(url, str) or not url:
                raise ConversationError(f"{pw}.{kind}.url must be a non-empty string.")
            if role != "user":
                raise ConversationError(f"{pw}: only user messages may carry images or videos.")
            detail = ref.get("detail") if isinstance(ref, Mapping) else None
            if detail is not None and detail not in ("low", "high", "auto"):
                raise ConversationError(f"{pw}.{kind}.detail is {detail!r}; use low, high or auto.")
            max_tiles = ref.get("max_tiles") if isinstance(ref, Mapping) else None
            if max_tiles is not None and (
                not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < 1
            ):
                raise ConversationError(f"{pw}.{kind}.max_tiles must be a positive integer.")
            parts.append(Media("image" if kind == "image_url" else "video", url, detail, max_tiles))
        else:
            raise ConversationError(f"{pw}.type is {kind!r}; supported part types are text, image_url and video_url.")
    return tuple(parts)


def conversation_media(messages: Sequence[Message]) -> list[Media]:
    """Every media item of the conversation, in prompt order."""
    return [media for m in messages for media in m.media]


def build_prompt(
    messages: Sequence[Message],
    *,
    template: Template,
    system_message: str,
    media_tiles: Sequence[Sequence[int]] = (),
    placeholders: bool = False,
    image_tokens_per_tile: int = IMAGE_TOKENS_PER_TILE,
    thinking: bool = False,
) -> Prompt:
    """The prompt for a conversation that ends with a user message.

    `thinking` (InternVL3.5's thinking mode) puts the model cards' reasoning
    system prompt in the place of `system_message`, as the cards' `model.system_message
    = R1_SYSTEM_PROMPT` does; a system message in the conversation still
    replaces it, as it replaces the default.

    `media_tiles` has one entry per media item in `conversation_media` order:
    `[tiles]` for an image, `[1] * frames` for a video. With `placeholders`
    (seed-style questions), messages carry no media; `media_tiles` lists the
    image blocks in order and `<image>` in message text marks where each goes.
    """
    system = [m for m in messages if m.role == "system"]
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[-1].role != "user":
        raise ConversationError("The conversation must end with a user message.")
    if thinking:
        system_message = THINKING_SYSTEM_PROMPT
    if system:
        system_message = "\n".join(m.text for m in system)

    b = _Builder(template)
    head, _, tail = template.system_template.partition("{system_message}")
    b.trusted(head)
    b.literal(system_message)
    b.trusted(tail)
    b.trusted(template.sep)

    if placeholders:
        render = _placeholder_renderer(turns, [t for block in media_tiles for t in block])
    else:
        render = _media_renderer(turns, media_tiles)
    for index, message in enumerate(turns):
        role = template.roles[0] if message.role == "user" else template.roles[1]
        b.trusted(role)
        start = b.written
        render(b, index, message)
        if b.written > start:  # the original writes `role + message + sep` only for a non-empty message
            b.trusted(template.sep)
    b.trusted(template.roles[1])
    return Prompt(tuple(b.pieces), template.stop_strings, image_tokens_per_tile)


def _media_renderer(turns: Sequence[Message], media_tiles: Sequence[Sequence[int]]):  # type: ignore[no-untyped-def]
    media = [m for t in turns for m in t.media]
    if len(media_tiles) != len(media):
        raise ConversationError(f"{len(media)} media items in the messages but tile counts for {len(media_tiles)}.")
    for item, tiles in zip(media, media_tiles, strict=True):
        if item.kind == "image" and len(tiles) != 1:
            raise ConversationError("An image is one block of tiles.")
        if any(t < 1 for t in tiles) or not tiles:
            raise ConversationError("Every image block needs at least one tile.")
    numbered = sum(1 for m in media if m.kind == "image") > 1
    cursor = iter(media_tiles)
    image_number = 0

    def render(b: _Builder, index: int, message: Message) -> None:
        nonlocal image_number
        for item in message.media:
            tiles = next(cursor)
            if item.kind == "image":
                image_number += 1
                if numbered:
                    b.literal(f"Image-{image_number}: ")
                b.image(tiles[0])
                b.literal("\n")
            else:
                for frame, n in enumerate(tiles, start=1):
                    b.literal(f"Frame{frame}: ")
                    b.image(n)
                    b.literal("\n")
        b.literal(message.text)

    return render


def _placeholder_renderer(turns: Sequence[Message], blocks: Sequence[int]):  # type: ignore[no-untyped-def]
    if any(m.media for m in turns):
        raise ConversationError("Seed-style questions take images as pixel values, not as message parts.")
    marked = sum(m.text.count(IMAGE_PLACEHOLDER) for m in turns if m.role == "user")
    prepend = None
    if blocks and marked == 0:
        prepend = next(i for i, m in enumerate(turns) if m.role == "user")
        marked = 1
    if marked != len(blocks):
        raise ConversationError(
            f"The question marks {marked} image place(s) with {IMAGE_PLACEHOLDER} but {len(blocks)} image(s) "
            "were given.",
            hint="Write one <image> per image (as in 'Image-1: <image>\\nImage-2: <image>\\n...'), "
            "or give num_patches_list=None to pass several images as one.",
        )
    cursor = iter(blocks)

    def render(b: _Builder, index: int, message: Message) -> None:
        text = message.text
        if index == prepend:
            text = IMAGE_PLACEHOLDER + "\n" + text
        if message.role != "user":
            b.literal(text)
            return
        for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                b.image(next(cursor))
            b.literal(part)

    return render
