"""`internvl chat`: one question (or an OpenAI messages file) to a model from
the shell. `--print-prompt` shows the exact prompt and loads nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from internvl_launch.cli._options import json_option, model_options
from internvl_launch.cli._output import emit_json
from internvl_launch.cli.plan_commands import request_from_flags
from internvl_launch.errors import ConversationError, MediaError
from internvl_launch.prompt import Message, Prompt, build_prompt, get_template, parse_messages
from internvl_launch.prompt.conversation import Media, conversation_media
from internvl_launch.prompt.thinking import ReasoningStream, split_reasoning, supports_thinking, thinking_unsupported
from internvl_launch.registry import Spec, load_registry
from internvl_launch.resolver import select_model
from internvl_launch.vision.limits import MAX_VIDEO_BYTES, MAX_VIDEO_FRAMES


def read_messages_file(path: str) -> tuple[list[Message], Path | None]:
    """Messages from a JSON file (`-` for stdin): a list of OpenAI messages or
    a request body with a `messages` key. Returns the directory relative media
    paths are read from."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MediaError(f"Cannot read messages file {path}: {exc.strerror or type(exc).__name__}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConversationError(f"{path}: line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg}).") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    base = None if path == "-" else Path(path).resolve().parent
    return parse_messages(data), base


def messages_from_flags(question: str | None, images: tuple[str, ...], video: str | None) -> list[Message]:
    """The one user message that `--image`/`--video` and a question make."""
    parts: list[str | Media] = [Media("image", ref) for ref in images]
    if video:
        parts.append(Media("video", video))
    parts.append(question or "")
    return [Message("user", tuple(parts))]


def media_tiles(messages: list[Message], *, max_tiles: int, num_frames: int, base_dir: Path | None) -> list[list[int]]:
    """Tile counts per media item, in prompt order: read from image headers
    (which also checks every image before a model is loaded); a video is one
    tile per sampled frame."""
    from internvl_launch.vision.media import image_size, read_media
    from internvl_launch.vision.tiling import num_tiles

    tiles: list[list[int]] = []
    for item in conversation_media(messages):
        if item.kind == "image":
            data = read_media(item.source, kind="image", base_dir=base_dir)
            width, height = image_size(data, item.source)
            tiles.append([num_tiles(width, height, max_tiles=max_tiles)])
        else:
            read_media(item.source, kind="video", base_dir=base_dir, max_bytes=MAX_VIDEO_BYTES)
            tiles.append([1] * num_frames)
    return tiles


def prompt_for(spec: Spec, messages: list[Message], tiles: list[list[int]], thinking: bool = False) -> Prompt:
    """The prompt the spec's template makes of the conversation."""
    return build_prompt(
        messages,
        template=get_template(spec.template),
        system_message=spec.system_message,
        media_tiles=tiles,
        thinking=thinking,
    )


def _reasoning_out(text: str) -> None:
    """Reasoning goes to stderr, dimmed on a terminal; the answer alone to stdout."""
    if text:
        click.echo(click.style(text, dim=True), err=True, nl=False)


@click.command("chat")
@model_options
@click.argument("question", required=False)
@click.option("--image", "images", multiple=True, help="Image file or data URL; repeat for several (Image-1, ...).")
@click.option("--video", help="Video file; frames are sampled evenly, one tile each.")
@click.option(
    "--num-frames",
    type=click.IntRange(1, MAX_VIDEO_FRAMES),
    default=8,
    show_default=True,
    help="Frames sampled from --video.",
)
@click.option(
    "--messages",
    "messages_file",
    help="OpenAI chat messages as JSON (a list, or a body with `messages`); `-` reads stdin. "
    "Images as paths (relative to the file) or data URLs.",
)
@click.option("--system", help="System message (default: the one the model was trained with).")
@click.option("--max-tiles", type=click.IntRange(1, 40), help="Most 448 px tiles per image (default: the spec's).")
@click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--stream", is_flag=True, help="Print the answer as it is generated.")
@click.option(
    "--enable-thinking",
    is_flag=True,
    help="InternVL3.5's thinking mode: the model cards' reasoning system prompt; the reasoning goes to stderr "
    "(or `reasoning` under --json), the answer to stdout.",
)
@click.option("--print-prompt", is_flag=True, help="Print the exact prompt that would be tokenized, and stop.")
@click.option(
    "--compact-images",
    is_flag=True,
    help="With --print-prompt: write each image's context tokens as <IMG_CONTEXT>*N.",
)
@json_option
def chat_command(
    question: str | None,
    images: tuple[str, ...],
    video: str | None,
    num_frames: int,
    messages_file: str | None,
    system: str | None,
    max_tiles: int | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stream: bool,
    enable_thinking: bool,
    print_prompt: bool,
    compact_images: bool,
    as_json: bool,
    **flags: Any,
) -> None:
    """Ask a model one question, with images or a video, from the shell.

    Runs on the Transformers engine; weights come through the same plan and
    download path as `launch` (a hub, the built-in internvl-tiny, or
    --model-path; original-layout checkpoints are converted once and cached).
    With no question and a terminal on stdin, it chats interactively: several
    rounds with history, answers streamed; /image PATH, /reset, /exit.

    \b
    internvl chat -n internvl2 -s 2 --image cat.jpg "Describe the image" --print-prompt
    internvl chat -n internvl2.5 --messages conversation.json --print-prompt --compact-images
    internvl chat -n internvl-tiny --image cat.jpg "Describe the image" --max-tokens 16 --json
    internvl chat -n internvl-tiny --image cat.jpg          # interactive, on a terminal
    internvl chat -n internvl3.5 -s 8 --enable-thinking "9.11 or 9.8, which is greater?"
    """
    if messages_file and (question or images or video):
        raise click.UsageError("--messages replaces the question, --image and --video; give one or the other.")
    interactive = not messages_file and question is None and not print_prompt and _is_terminal()
    if not messages_file and question is None and not interactive:
        raise click.UsageError("Give a question (or --messages FILE; with a terminal on stdin, chat interactively).")
    if interactive and as_json:
        raise click.UsageError("--json needs a question; the interactive mode prints answers as they come.")
    if compact_images and not print_prompt:
        raise click.UsageError("--compact-images only applies with --print-prompt.")
    if stream and as_json:
        raise click.UsageError("--stream and --json do not go together; --json prints the whole answer at the end.")

    registry = load_registry(flags["specs_dirs"])
    family, spec, _quantization, _ = select_model(registry, request_from_flags(flags))
    if enable_thinking and not supports_thinking(spec):
        raise click.UsageError(thinking_unsupported(f"{family.name}:{spec.size_label}b"))
    if interactive:
        _interactive(
            flags, images, video, system, max_tiles, num_frames, max_tokens, temperature, top_p, seed, enable_thinking
        )
        return
    if messages_file:
        messages, base_dir = read_messages_file(messages_file)
    else:
        messages, base_dir = messages_from_flags(question, images, video), None
    if system is not None:
        messages = [Message("system", (system,)), *[m for m in messages if m.role != "system"]]
    tiles = media_tiles(messages, max_tiles=max_tiles or spec.max_tiles, num_frames=num_frames, base_dir=base_dir)

    if print_prompt:
        prompt = prompt_for(spec, messages, tiles, thinking=enable_thinking)
        if as_json:
            emit_json(
                {
                    "model": f"{family.name}:{spec.size_label}b",
                    "template": spec.template,
                    "prompt": prompt.render(compact=compact_images),
                    "image_blocks": list(prompt.image_blocks),
                    "image_tokens": prompt.num_image_tokens,
                    "stop": list(prompt.stop),
                }
            )
        else:
            # Exactly the prompt: every template ends it with a newline already.
            click.echo(prompt.render(compact=compact_images), nl=False)
        return
    _generate(
        flags,
        messages,
        base_dir=base_dir,
        max_tiles=max_tiles,
        num_frames=num_frames,
        params={"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed},
        stream=stream,
        as_json=as_json,
        thinking=enable_thinking,
    )


def _load(flags: dict[str, Any], max_tiles: int | None) -> Any:
    """The model the flags name, on the Transformers engine: the same request
    and plan as `launch` (hub, revision, GPUs and context length included)."""
    from dataclasses import replace

    from internvl_launch.api import load_plan
    from internvl_launch.environment import probe_environment
    from internvl_launch.resolver import resolve_plan

    request = replace(request_from_flags(flags), engine="transformers")
    plan = resolve_plan(load_registry(flags["specs_dirs"]), request, probe_environment())
    return load_plan(plan, max_tiles, notify=lambda m: click.echo(f"internvl: {m}", err=True))


def _generate(
    flags: dict[str, Any],
    messages: list[Message],
    *,
    base_dir: Path | None,
    max_tiles: int | None,
    num_frames: int,
    params: dict[str, Any],
    stream: bool,
    as_json: bool,
    thinking: bool = False,
) -> None:
    import time

    from internvl_launch.engines.transformers_engine import SamplingParams

    started = time.perf_counter()
    model = _load(flags, max_tiles)
    loaded = time.perf_counter()
    request = model.prepare_messages(
        messages, max_tiles=max_tiles, num_frames=num_frames, base_dir=base_dir, thinking=thinking
    )
    sampling = SamplingParams(**params)
    if stream:
        _stream_reply(model.engine.stream(request, sampling), thinking)
        return
    result = model.engine.generate([request], sampling)[0]
    reasoning, answer = split_reasoning(result.text) if thinking else (None, result.text)
    if as_json:
        emit_json(
            {
                "model": model.plan.model_ref,
                "answer": answer,
                **({"reasoning": reasoning} if thinking else {}),
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "timings": {
                    "load_s": round(loaded - started, 4),
                    "generate_s": round(result.timings["total_s"], 4),
                },
            }
        )
    else:
        if reasoning:
            _reasoning_out(reasoning.strip() + "\n")
        click.echo(answer.strip())


def _stream_reply(deltas: Any, thinking: bool) -> str:
    """Print a streamed reply (in thinking mode: reasoning to stderr, the
    answer to stdout) and return the answer."""
    split = ReasoningStream() if thinking else None
    answer: list[str] = []
    thought = False

    def show(reasoning: str, text: str) -> None:
        nonlocal thought
        if reasoning:
            thought = True
            _reasoning_out(reasoning)
        if text:
            if thought:  # the reasoning ended without a newline of its own
                click.echo("", err=True)
                thought = False
            answer.append(text)
            click.echo(text, nl=False)

    for delta in deltas:
        show(*(split.feed(delta) if split else ("", delta)))
    if split is not None:
        show(*split.finish())
    if thought:
        click.echo("", err=True)
    click.echo("")
    return "".join(answer)


def _is_terminal() -> bool:
    return sys.stdin.isatty()


HELP = "Commands: /image PATH (attach to the next question), /reset (forget the conversation), /exit (or Ctrl-D)."


def _interactive(
    flags: dict[str, Any],
    images: tuple[str, ...],
    video: str | None,
    system: str | None,
    max_tiles: int | None,
    num_frames: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    thinking: bool = False,
) -> None:
    """A multi-round conversation on a terminal: each answer streams and joins
    the history the next question is asked with, as the model cards'
    `model.chat(..., history=history)` does. --image and --video attach to the
    first question; `/image PATH` to the next one."""
    from internvl_launch.engines.transformers_engine import SamplingParams

    model = _load(flags, max_tiles)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    history: list[Message] = [Message("system", (system,))] if system is not None else []
    pending: list[str | Media] = [Media("image", ref) for ref in images]
    if video:
        pending.append(Media("video", video))
    click.echo(f"{model.plan.model_ref} - {HELP}", err=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo("", err=True)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = history[:1] if history and history[0].role == "system" else []
            pending = []
            click.echo("(conversation cleared)", err=True)
            continue
        if text.startswith("/image"):
            path = text.removeprefix("/image").strip()
            if not path or not Path(path).expanduser().is_file():
                click.echo(f"no such image: {path or '(none given)'}", err=True)
            else:
                pending.append(Media("image", str(Path(path).expanduser())))
            continue
        if text.startswith("/"):
            click.echo(HELP, err=True)
            continue
        turn = Message("user", (*pending, text))
        try:
            request = model.prepare_messages(
                [*history, turn], max_tiles=max_tiles, num_frames=num_frames, thinking=thinking
            )
        except (MediaError, ConversationError) as err:
            click.echo(f"error: {err.message}", err=True)
            pending = []
            continue
        pending = []
        answer = _stream_reply(model.engine.stream(request, sampling), thinking)
        history += [turn, Message("assistant", (answer.strip(),))]
