"""The Python API: `load()` a model through the same plan the CLI uses, then
`chat`, `batch_chat` and `stream` as the model cards' `model.chat` does.

    import internvl_launch
    model = internvl_launch.load("internvl-tiny")
    model.chat("Describe the image.", image="cat.jpg")
    reply, history = model.chat("<image>\\nDescribe.", image="cat.jpg", return_history=True)
    reply, history = model.chat("Write a poem about it.", image="cat.jpg", history=history, return_history=True)
    model.chat("Image-1: <image>\\nImage-2: <image>\\nCompare.", image=["a.jpg", "b.jpg"])
    model.chat("What happens?", video="clip.mp4")
    model.batch_chat(["Describe.", "Describe."], images=["a.jpg", "b.jpg"])
    for delta in model.stream("Tell me a story."): print(delta, end="")
    model.chat_messages([{"role": "user", "content": [...]}])   # OpenAI messages

InternVL3.5 (specs with `thinking`) thinks when asked: `enable_thinking=True`
puts the model cards' reasoning system prompt in the prompt, and the reply is
the answer after `</think>`; `return_reasoning=True` returns the reasoning too.

    answer, reasoning = model.chat("9.11 or 9.8?", enable_thinking=True, return_reasoning=True)
    model.chat_messages(messages, enable_thinking=True).reasoning
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from internvl_launch.engines.transformers_engine import (
    Completion,
    GenerationRequest,
    SamplingParams,
    TransformersEngine,
    require_supported,
)
from internvl_launch.environment import probe_environment
from internvl_launch.errors import ConversationError
from internvl_launch.prompt import Message, Prompt, build_prompt, conversation_media, get_template, parse_messages
from internvl_launch.prompt.thinking import split_reasoning, supports_thinking, thinking_unsupported
from internvl_launch.registry import Spec, load_registry
from internvl_launch.request import LaunchRequest
from internvl_launch.resolver import LaunchPlan, resolve_plan
from internvl_launch.weights import locate_weights

ImageLike = Any  # path, bytes, PIL image
History = list[tuple[str, str]]


@dataclass
class InternVLModel:
    """A loaded model with the conversation helpers around its engine."""

    plan: LaunchPlan
    engine: TransformersEngine
    max_tiles: int

    @property
    def spec(self) -> Spec:
        return self.plan.spec

    # -- inputs ---------------------------------------------------------------

    def _pixels(self, images: Sequence[ImageLike], max_tiles: int | None) -> list[Any]:
        from internvl_launch.vision.tiling import preprocess_image

        return [preprocess_image(img, max_tiles=max_tiles or self.max_tiles) for img in images]

    def _video(self, video: Any, num_frames: int) -> Any:
        from internvl_launch.vision.video import load_video

        return load_video(video, num_segments=num_frames)

    def _prompt(
        self, messages: Sequence[Message], tiles: Sequence[Sequence[int]], placeholders: bool, thinking: bool = False
    ) -> Prompt:
        if thinking and not supports_thinking(self.spec):
            raise ConversationError(thinking_unsupported(self.plan.model_ref))
        return build_prompt(
            messages,
            template=get_template(self.spec.template),
            system_message=self.spec.system_message,
            media_tiles=tiles,
            placeholders=placeholders,
            thinking=thinking,
        )

    def prepare_question(
        self,
        question: str,
        *,
        image: ImageLike | Sequence[ImageLike] | None = None,
        video: Any = None,
        num_frames: int = 8,
        history: History | None = None,
        max_tiles: int | None = None,
        system: str | None = None,
        thinking: bool = False,
    ) -> tuple[GenerationRequest, str]:
        """A seed-style question as a request, and the question as history keeps it."""
        import torch

        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        blocks = self._pixels(images, max_tiles)
        if video is not None:
            frames = self._video(video, num_frames)
            blocks += list(frames.pixel_values.split(1))
            if "<image>" not in question:  # the cards' video prompt: Frame1: <image>\n...
                question = "".join(f"Frame{i}: <image>\n" for i in range(1, len(frames.frame_indices) + 1)) + question
        messages: list[Message] = [Message("system", (system,))] if system is not None else []
        for old_q, old_a in history or []:
            messages += [Message("user", (old_q,)), Message("assistant", (old_a,))]
        if blocks and not history and "<image>" not in question:
            question = "<image>\n" + question  # what the original stores in history
        messages.append(Message("user", (question,)))
        prompt = self._prompt(messages, [[int(b.shape[0])] for b in blocks], placeholders=True, thinking=thinking)
        pixels = torch.cat(blocks) if blocks else None
        return GenerationRequest(prompt, pixels), question

    def prepare_messages(
        self,
        messages: Any,
        *,
        max_tiles: int | None = None,
        num_frames: int = 8,
        base_dir: Path | None = None,
        thinking: bool = False,
    ) -> GenerationRequest:
        """OpenAI chat messages (images as paths, data URLs or bytes) as a request."""
        import torch

        from internvl_launch.vision.media import read_media

        parsed = messages if messages and isinstance(messages[0], Message) else parse_messages(messages)
        tiles: list[list[int]] = []
        pixels = []
        for item in conversation_media(parsed):
            source = item.source
            if isinstance(source, str):
                source = read_media(source, kind=item.kind, base_dir=base_dir)
            if item.kind == "image":
                block = self._pixels([source], max_tiles)[0]
                tiles.append([int(block.shape[0])])
                pixels.append(block)
            else:
                frames = self._video(source, num_frames)
                tiles.append([1] * len(frames.frame_indices))
                pixels.append(frames.pixel_values)
        prompt = self._prompt(parsed, tiles, placeholders=False, thinking=thinking)
        return GenerationRequest(prompt, torch.cat(pixels) if pixels else None)

    # -- generation -------------------------------------------------------------

    def chat(
        self,
        question: str,
        *,
        image: ImageLike | Sequence[ImageLike] | None = None,
        video: Any = None,
        history: History | None = None,
        return_history: bool = False,
        enable_thinking: bool = False,
        return_reasoning: bool = False,
        **params: Any,
    ) -> Any:
        """One reply, as `model.chat` gives it; with `return_history`, also the
        history to pass to the next call.

        `enable_thinking` (InternVL3.5) asks the model to think first: the reply
        is then the answer after the thinking, `return_reasoning` returns
        `(answer, reasoning)` (and the history last, with `return_history`).
        History keeps the answers only, not the reasoning."""
        request, asked = self.prepare_question(
            question, image=image, video=video, history=history, thinking=enable_thinking
        )
        text = self.engine.generate([request], SamplingParams(**params))[0].text
        reasoning, reply = split_reasoning(text) if enable_thinking else ("", text)
        reply = reply.strip()
        out: tuple[Any, ...] = (reply,)
        if return_reasoning:
            out += (reasoning,)
        if return_history:
            out += ([*(history or []), (asked, reply)],)
        return out if len(out) > 1 else reply

    def batch_chat(
        self, questions: Sequence[str], *, images: Sequence[ImageLike | None] | None = None, **params: Any
    ) -> list[str]:
        """Replies to several independent questions, generated as one batch."""
        images = list(images) if images is not None else [None] * len(questions)
        if len(images) != len(questions):
            raise ValueError("give one image (or None) per question")
        requests = [self.prepare_question(q, image=img)[0] for q, img in zip(questions, images, strict=True)]
        return [c.text.strip() for c in self.engine.generate(requests, SamplingParams(**params))]

    def stream(
        self,
        question: str,
        *,
        image: ImageLike | Sequence[ImageLike] | None = None,
        video: Any = None,
        history: History | None = None,
        **params: Any,
    ) -> Iterator[str]:
        """Text deltas of one reply."""
        request, _ = self.prepare_question(question, image=image, video=video, history=history)
        return self.engine.stream(request, SamplingParams(**params))

    def chat_messages(self, messages: Any, *, enable_thinking: bool = False, **params: Any) -> Completion:
        """One reply to OpenAI chat messages, with token counts. With
        `enable_thinking` (InternVL3.5), `text` is the answer and `reasoning`
        the thinking before it."""
        request = self.prepare_messages(messages, thinking=enable_thinking)
        result = self.engine.generate([request], SamplingParams(**params))[0]
        if enable_thinking:
            result.reasoning, result.text = split_reasoning(result.text)
        return result


def load(
    model_name: str | None = None,
    *,
    size: float | str | None = None,
    quantization: str | None = None,
    model_format: str | None = None,
    device: str = "auto",
    model_path: str | os.PathLike[str] | None = None,
    template: str | None = None,
    max_tiles: int | None = None,
    specs_dirs: Sequence[str] = (),
    memory_check: bool | None = None,
    notify: Callable[[str], None] | None = None,
) -> InternVLModel:
    """Resolve the model as `internvl resolve` would (Transformers engine),
    find its weights and load it. Without a name, `model_path` describes
    itself (layout, backbone, template, tiles, size), and with neither the
    built-in internvl-tiny is loaded. The memory check is skipped for a local
    `model_path` unless `memory_check` says otherwise."""
    from internvl_launch.request import parse_size

    if model_name is None:
        model_name = "" if model_path is not None else "internvl-tiny"
    request = LaunchRequest(
        model_name=model_name,
        size=parse_size(size) if size is not None else None,
        format=model_format,
        quantization=quantization,
        engine="transformers",
        device=device,  # type: ignore[arg-type]
        memory_check=(model_path is None) if memory_check is None else memory_check,
        model_path=str(model_path) if model_path is not None else None,
        template=template,
    )
    return load_plan(resolve_plan(load_registry(specs_dirs), request, probe_environment()), max_tiles, notify)


def load_plan(
    plan: LaunchPlan, max_tiles: int | None = None, notify: Callable[[str], None] | None = None
) -> InternVLModel:
    """Load a resolved Transformers-engine plan: its weights (fetched or
    converted as needed), then the engine."""
    require_supported(plan)
    engine = TransformersEngine.for_plan(plan, locate_weights(plan, notify=notify))
    return InternVLModel(plan, engine, max_tiles or plan.spec.max_tiles)
