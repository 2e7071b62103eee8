"""The Transformers engine: a native `InternVLForConditionalGeneration` loaded
in the plan's dtype and quantization, fed with our tiling and our prompts.

One `TransformersEngine` serves many conversations: `generate` takes several
at once (left padding, each stopping on its own), `stream` yields text deltas
for one. Stop handling follows the original `chat()`: the template's end token
is the end-of-sequence token, and the reply is cut at the template's stop
strings where the tokenizer does not have them as single tokens.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl_launch.errors import ConversationError, EngineUnavailableError
from internvl_launch.prompt import Prompt
from internvl_launch.resolver import BNB_SKIP_MODULES


@dataclass(frozen=True)
class SamplingParams:
    """Generation settings, with OpenAI's names. `temperature` 0 is greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


@dataclass(frozen=True)
class GenerationRequest:
    """One conversation ready for the model: its prompt and its tiles, in prompt order."""

    prompt: Prompt
    pixel_values: Any = None  # torch.Tensor (tiles, 3, 448, 448) or None


@dataclass
class Completion:
    """A finished reply."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def bnb_config(quantization: str, compute_dtype: str) -> Any:
    """A `BitsAndBytesConfig` that keeps the vision tower, the projector and
    `lm_head` in full precision. Full module names: short ones silently fail
    to match in Transformers 5.x and the vision tower gets quantized."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = list(BNB_SKIP_MODULES)
    if quantization == "8-bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quantization == "4-bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_torch_dtype(compute_dtype) if compute_dtype != "float32" else torch.float32,
            llm_int8_skip_modules=skip,
        )
    raise ValueError(f"no bitsandbytes config for quantization {quantization!r}")


class TransformersEngine:
    """A loaded model and tokenizer, and the generation loop around them."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        quantization: str = "none",
        device_map: Any = None,
        stop: Sequence[str] = (),
    ) -> None:
        try:
            import torch
            from transformers import AutoTokenizer, InternVLForConditionalGeneration
            from transformers.utils import logging as hf_logging
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise EngineUnavailableError(
                f"The Transformers engine needs torch and transformers: {exc}.",
                hint="pip install 'internvl-launch[transformers]'",
            ) from None
        hf_logging.disable_progress_bar()
        self.path = Path(path)
        self.device = device
        self.dtype = dtype
        self.quantization = quantization
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype)}
        if quantization in ("8-bit", "4-bit"):
            kwargs["quantization_config"] = bnb_config(quantization, dtype)
            kwargs["device_map"] = device_map or ("cpu" if device == "cpu" else {"": 0})
        elif device_map is not None:
            kwargs["device_map"] = device_map
        model = InternVLForConditionalGeneration.from_pretrained(self.path, **kwargs)
        if "device_map" not in kwargs:
            model = model.to(device)
        self.model = model.eval()
        self.load_seconds = time.perf_counter() - started
        # Built once: get_vocab() constructs a new dict of the whole vocabulary on every call.
        self.vocab = vocab = self.tokenizer.get_vocab()
        self.stop = tuple(stop)
        #: Stop strings that are single tokens of this tokenizer end generation as tokens.
        self.stop_token_ids = [vocab[s] for s in self.stop if s in vocab]
        eos = self.model.generation_config.eos_token_id
        for token_id in [eos] if isinstance(eos, int) else list(eos or []):
            if token_id not in self.stop_token_ids:
                self.stop_token_ids.append(token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_token_ids[0]
        self._seed_lock = threading.Lock()
        self._torch = torch

    @property
    def input_device(self) -> Any:
        return self.model.get_input_embeddings().weight.device

    @property
    def vision_dtype(self) -> Any:
        return next(self.model.model.vision_tower.parameters()).dtype

    # -- inputs -------------------------------------------------------------

    def encode(self, request: GenerationRequest) -> list[int]:
        ids = request.prompt.encode(self.tokenizer, self.vocab)
        tiles = sum(request.prompt.image_blocks)
        given = 0 if request.pixel_values is None else int(request.pixel_values.shape[0])
        if tiles != given:
            raise ConversationError(f"The prompt has {tiles} image tiles but {given} were given.")
        return ids

    def _batch(self, requests: Sequence[GenerationRequest]) -> tuple[Any, Any, Any, list[int]]:
        torch = self._torch
        encoded = [self.encode(r) for r in requests]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        pixels = [r.pixel_values for r in requests if r.pixel_values is not None]
        pixel_values = torch.cat(pixels).to(self.input_device, self.vision_dtype) if pixels else None
        return input_ids.to(self.input_device), mask.to(self.input_device), pixel_values, [len(e) for e in encoded]

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.pad_id,
            "repetition_penalty": params.repetition_penalty,
        }
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        stops = self._stop_strings(params)
        if stops:
            kwargs.update(stop_strings=list(stops), tokenizer=self.tokenizer)
        return kwargs

    def _stop_strings(self, params: SamplingParams) -> tuple[str, ...]:
        """The template's stop strings this tokenizer lacks as single tokens,
        and every stop string of the request."""
        return tuple(dict.fromkeys([*(s for s in self.stop if s not in self.vocab), *(s for s in params.stop if s)]))

    @contextlib.contextmanager
    def _seeded(self, params: SamplingParams) -> Iterator[None]:
        """Seed torch's generator for this call; seeded calls take turns."""
        if params.seed is None:
            yield
            return
        with self._seed_lock:
            self._torch.manual_seed(params.seed)
            yield

    # -- generation ---------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams) -> list[Completion]:
        """Replies for several conversations, generated together."""
        torch = self._torch
        started = time.perf_counter()
        input_ids, mask, pixel_values, lengths = self._batch(requests)
        with torch.inference_mode(), self._seeded(params):
            output = self.model.generate(
                input_ids=input_ids, attention_mask=mask, **_pixels(pixel_values), **self._generate_kwargs(params)
            )
        elapsed = time.perf_counter() - started
        new = output[:, input_ids.shape[1] :].tolist()
        results = []
        for row, tokens in enumerate(new):
            text, reason, count = self._finish(tokens, params)
            results.append(
                Completion(text, reason, lengths[row], count, {"total_s": elapsed, "load_s": self.load_seconds})
            )
        return results

    def _finish(self, tokens: list[int], params: SamplingParams) -> tuple[str, str, int]:
        """Text, finish reason and completion token count of one generated row
        (the end token counts; the padding after a finished row does not)."""
        end = len(tokens)
        count = end
        reason = "length"
        for i, token in enumerate(tokens):
            if token in self.stop_token_ids or token == self.pad_id:
                end, reason = i, "stop"
                count = i + int(token in self.stop_token_ids)
                break
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        cut, hit = _cut_at_stop(text, self._stop_strings(params))
        return cut, "stop" if hit else reason, count

    def stream(self, request: GenerationRequest, params: SamplingParams) -> Iterator[str]:
        """Text deltas of one reply as they are generated. Text that may be the
        start of a stop string is held back until it is known not to be."""
        from transformers import TextIteratorStreamer

        torch = self._torch
        input_ids, mask, pixel_values, _ = self._batch([request])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode(), self._seeded(params):
                    self.model.generate(
                        input_ids=input_ids,
                        attention_mask=mask,
                        streamer=streamer,
                        **_pixels(pixel_values),
                        **self._generate_kwargs(params),
                    )
            except BaseException as exc:  # re-raised in the consumer
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="internvl-generate", daemon=True)
        worker.start()
        stops = self._stop_strings(params)
        sent = 0
        text = ""
        for piece in streamer:
            text += piece
            cut, hit = _cut_at_stop(text, stops)
            if hit:
                if len(cut) > sent:
                    yield cut[sent:]
                break
            safe = len(text) - _held_back(text, stops)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        else:
            cut, _ = _cut_at_stop(text, stops)
            if len(cut) > sent:
                yield cut[sent:]
        worker.join()
        if failure:
            raise failure[0]


def _pixels(pixel_values: Any) -> dict[str, Any]:
    # Passing pixel_values=None makes generate() run the vision tower on nothing.
    return {} if pixel_values is None else {"pixel_values": pixel_values}


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stops if s]
    positions = [p for p in positions if p >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could begin a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                longest = max(longest, n)
                break
    return longest
