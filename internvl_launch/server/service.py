"""What the server does with a chat request, apart from HTTP: fetch and tile
its media, build the exact prompt, check its costs against the server's
limits, and run it through the dynamic batcher.

The batcher collects the requests that arrive within a short window (or until
the batch is full), groups those whose sampling settings can share one
`generate` call, and runs them on one engine thread. Each row stops on its
own; streamed text flows back to the event loop as it is decoded; a client
that goes away cancels its row.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from internvl_launch.engines.transformers_engine import (
    Completion,
    GenerationRequest,
    Row,
    SamplingParams,
    TransformersEngine,
)
from internvl_launch.errors import ConversationError, InternVLError, MediaError
from internvl_launch.prompt import Message, build_prompt, conversation_media, get_template, parse_messages
from internvl_launch.registry import Spec
from internvl_launch.server.fetch import MediaFetcher
from internvl_launch.vision.limits import MAX_IMAGE_BYTES, MAX_VIDEO_BYTES, MAX_VIDEO_FRAMES


class Overloaded(InternVLError):
    """Every running and queued slot is taken; the client should retry later."""


class EngineFault(InternVLError):
    """The engine failed while generating; the server is no longer healthy."""


class TooLong(ConversationError):
    """The prompt (with its image tokens) and the reply do not fit the context."""


@dataclass(frozen=True)
class ServiceLimits:
    max_tiles: int = 12  # per image; requests are clamped to it
    max_images: int = 16  # media items per request, checked before any fetch
    max_videos: int = 2
    max_frames: int = MAX_VIDEO_FRAMES
    default_frames: int = 8
    max_model_len: int = 8192
    default_max_tokens: int = 512
    max_batch: int = 8
    batch_wait_s: float = 0.01  # the window after the first request of a batch
    batch_wait_preparing_s: float = 0.25  # longest extra wait for requests still fetching or tiling their media
    max_queue: int = 64  # running + waiting requests; beyond it: 429
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_video_bytes: int = MAX_VIDEO_BYTES


@dataclass
class Prepared:
    """A request ready for the engine, and what it cost to get there."""

    request: GenerationRequest
    prompt_tokens: int
    image_tokens: int
    media_s: float


@dataclass
class Job:
    prepared: Prepared
    params: SamplingParams
    on_text: Callable[[str], None] | None
    future: asyncio.Future[Completion]
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None


class Batcher:
    """Dynamic batching onto one engine thread."""

    def __init__(self, engine: TransformersEngine, limits: ServiceLimits, observe: Any = None) -> None:
        self.engine = engine
        self.limits = limits
        self.observe = observe  # metrics hooks, or None
        self._waiting: collections.deque[Job] = collections.deque()
        self._wakeup = asyncio.Event()
        self._running = 0
        self.preparing = 0  # requests validated and still fetching or tiling their media
        self._task: asyncio.Task[None] | None = None
        self._thread = _EngineThread()
        self.fault: str | None = None
        self._calls = 0
        # Fault injection for tests of the failure path: fail the N-th generate call.
        inject = os.environ.get("INTERNVL_INJECT_ENGINE_FAULT", "")
        self._fail_at = int(inject) if inject.isdigit() else None

    @property
    def depth(self) -> int:
        return len(self._waiting) + self._running

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="internvl-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._waiting:
            if not job.future.done():
                job.future.set_exception(EngineFault("The server is shutting down."))
        self._waiting.clear()
        self._thread.close()

    def wake(self) -> None:
        """Let a waiting batch window look again (a request finished preparing)."""
        self._wakeup.set()

    def submit(self, job: Job) -> None:
        if self.fault is not None:
            raise EngineFault(f"The engine failed earlier ({self.fault}); the server is not healthy.")
        if self.depth >= self.limits.max_queue:
            raise Overloaded(f"The server is at capacity ({self.limits.max_queue} requests running or waiting).")
        self._waiting.append(job)
        self._wakeup.set()
        if self.observe:
            self.observe.queue(self.depth)

    async def _loop(self) -> None:
        while True:
            if not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            # A short window lets concurrent arrivals join the same batch; requests
            # still preparing their media are waited for a little longer, since
            # one generate call for all of them beats one call each.
            now = time.perf_counter()
            deadline = now + self.limits.batch_wait_s
            longest = now + self.limits.batch_wait_preparing_s
            while len(self._waiting) < self.limits.max_batch:
                until = longest if self.preparing > 0 else deadline
                left = until - time.perf_counter()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:  # woken by a new request, or by one that finished preparing
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    continue
            batch = self._take_batch()
            if not batch:
                continue
            await self._run(batch)

    def _take_batch(self) -> list[Job]:
        """The oldest live job and every waiting job that can share its call."""
        while self._waiting and self._waiting[0].cancel.is_set():
            job = self._waiting.popleft()
            if not job.future.done():
                job.future.cancel()
        if not self._waiting:
            return []
        key = _share_key(self._waiting[0].params)
        batch: list[Job] = []
        keep: collections.deque[Job] = collections.deque()
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancel.is_set():
                if not job.future.done():
                    job.future.cancel()
            elif len(batch) < self.limits.max_batch and _share_key(job.params) == key:
                batch.append(job)
            else:
                keep.append(job)
        self._waiting = keep
        return batch

    async def _run(self, batch: list[Job]) -> None:
        self._running = len(batch)
        started = time.perf_counter()
        for job in batch:
            job.started = started
        rows = [Row(j.prepared.request, j.params, on_text=j.on_text, cancel=j.cancel) for j in batch]
        if self.observe:
            self.observe.batch(len(batch), [started - j.enqueued for j in batch])
        self._calls += 1
        run = self.engine.run if self._calls != self._fail_at else _injected_fault
        try:
            results = await self._thread.call(run, rows, batch[0].params)
        except InternVLError as err:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
        except Exception as err:  # a fault of the engine, not of the request
            self.fault = type(err).__name__
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(EngineFault("The engine failed while generating."))
        else:
            for job, result in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)
        finally:
            self._running = 0
            if self.observe:
                self.observe.queue(self.depth)


def _injected_fault(rows: Any, params: Any) -> Any:
    raise RuntimeError("injected engine fault (INTERNVL_INJECT_ENGINE_FAULT)")


def _share_key(params: SamplingParams) -> tuple[Any, ...]:
    """Rows share one generate() call when everything but their own limits agrees."""
    return (params.temperature, params.top_p, params.top_k, params.repetition_penalty, params.seed)


class _EngineThread:
    """One thread that owns the model: generate calls never overlap."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="internvl-engine")

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ChatService:
    """Messages in, `Prepared` requests out, then through the batcher."""

    def __init__(
        self,
        engine: TransformersEngine,
        spec: Spec,
        *,
        limits: ServiceLimits,
        fetcher: MediaFetcher,
        observe: Any = None,
        thinking: bool = False,
    ) -> None:
        self.engine = engine
        self.spec = spec
        #: Thinking mode for requests that do not say (`launch --enable-thinking`).
        self.thinking = thinking
        self.template = get_template(spec.template)
        self.limits = limits
        self.fetcher = fetcher
        self.batcher = Batcher(engine, limits, observe)

    def tiles_for(self, detail: str | None, asked: int | None) -> int:
        """Tiles for one image: `detail: low` is one tile, `high`/`auto` the
        server's maximum, an explicit `max_tiles` is clamped to it."""
        if asked is not None:
            return max(1, min(asked, self.limits.max_tiles))
        if detail == "low":
            return 1
        return self.limits.max_tiles

    async def prepare(
        self,
        raw_messages: Sequence[Any],
        *,
        max_tiles: int | None = None,
        num_frames: int | None = None,
        thinking: bool = False,
    ) -> tuple[Prepared, list[Message]]:
        messages = parse_messages(raw_messages)
        if messages[-1].role != "user":
            raise ConversationError("The last message must be from the user.")
        media = conversation_media(messages)
        images = [m for m in media if m.kind == "image"]
        videos = [m for m in media if m.kind == "video"]
        if len(images) > self.limits.max_images:
            raise ConversationError(
                f"The request has {len(images)} images; this server takes at most {self.limits.max_images}."
            )
        if len(videos) > self.limits.max_videos:
            raise ConversationError(
                f"The request has {len(videos)} videos; this server takes at most {self.limits.max_videos}."
            )
        frames = self.limits.default_frames if num_frames is None else num_frames
        if not 1 <= frames <= self.limits.max_frames:
            raise ConversationError(f"num_frames must be between 1 and {self.limits.max_frames}.")
        started = time.perf_counter()
        self.batcher.preparing += 1
        try:
            return await self._prepare_media(messages, media, frames, max_tiles, started, thinking)
        finally:
            self.batcher.preparing -= 1
            self.batcher.wake()

    async def _prepare_media(
        self,
        messages: list[Message],
        media: list[Any],
        frames: int,
        max_tiles: int | None,
        started: float,
        thinking: bool,
    ) -> tuple[Prepared, list[Message]]:
        payloads = await asyncio.gather(
            *(
                self.fetcher.fetch(
                    m.source,
                    kind=m.kind,
                    max_bytes=self.limits.max_image_bytes if m.kind == "image" else self.limits.max_video_bytes,
                )
                for m in media
            )
        )
        blocks = await asyncio.gather(
            *(
                asyncio.to_thread(
                    self._decode, m.kind, data, self.tiles_for(m.detail, m.max_tiles or max_tiles), frames
                )
                for m, data in zip(media, payloads, strict=True)
            )
        )
        media_s = time.perf_counter() - started
        prompt = build_prompt(
            messages,
            template=self.template,
            system_message=self.spec.system_message,
            media_tiles=[tiles for tiles, _ in blocks],
            thinking=thinking,
        )
        import torch

        pixels = torch.cat([px for _, px in blocks]) if blocks else None
        request = GenerationRequest(prompt, pixels)
        ids = self.engine.encode(request)
        request = GenerationRequest(prompt, pixels, tuple(ids))
        return Prepared(request, len(ids), prompt.num_image_tokens, media_s), messages

    def _decode(self, kind: str, data: bytes, tiles: int, frames: int) -> tuple[list[int], Any]:
        if kind == "image":
            from internvl_launch.vision.tiling import preprocess_image

            px = preprocess_image(data, max_tiles=tiles)
            return [int(px.shape[0])], px
        from internvl_launch.vision.video import load_video

        video = load_video(data, num_segments=frames, max_bytes=self.limits.max_video_bytes)
        return [1] * len(video.frame_indices), video.pixel_values

    def budget(self, prepared: Prepared, max_tokens: int | None) -> int:
        """The reply's token budget, or `TooLong` stating the counts."""
        room = self.limits.max_model_len - prepared.prompt_tokens
        if room < 1:
            raise TooLong(
                f"The prompt is {prepared.prompt_tokens} tokens ({prepared.image_tokens} of them image tokens), "
                f"over this model's context of {self.limits.max_model_len} tokens.",
                hint="Send fewer or smaller images (detail: low, or a lower max_tiles), or a shorter conversation.",
            )
        if max_tokens is None:
            return min(room, self.limits.default_max_tokens)
        if max_tokens > room:
            raise TooLong(
                f"max_tokens is {max_tokens}, but the prompt takes {prepared.prompt_tokens} of the "
                f"{self.limits.max_model_len}-token context ({prepared.image_tokens} image tokens), leaving {room}.",
                hint=f"Ask for at most {room} tokens, or send a smaller prompt.",
            )
        return max_tokens

    def submit(self, prepared: Prepared, params: SamplingParams, on_text: Callable[[str], None] | None) -> Job:
        job = Job(prepared, params, on_text, asyncio.get_running_loop().create_future())
        self.batcher.submit(job)
        return job


def warmup_image() -> bytes:
    """A small generated PNG for the readiness check."""
    import io

    from PIL import Image

    img = Image.new("RGB", (64, 48))
    img.putdata([(x * 4 % 256, y * 5 % 256, (x + y) % 256) for y in range(48) for x in range(64)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


__all__ = [
    "Batcher",
    "ChatService",
    "EngineFault",
    "Job",
    "MediaError",
    "Overloaded",
    "Prepared",
    "ServiceLimits",
    "TooLong",
    "warmup_image",
]
