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
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl_launch.engines.pixel_shuffle import apply_pixel_shuffle
from internvl_launch.errors import ConversationError, EngineUnavailableError
from internvl_launch.prompt import Prompt
from internvl_launch.resolver import BNB_SKIP_MODULES, LaunchPlan


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
    input_ids: tuple[int, ...] | None = None  # the prompt's ids, when already encoded


@dataclass
class Completion:
    """A finished reply."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    #: In thinking mode, the reasoning split off `text` (set by the callers that split).
    reasoning: str | None = None


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


#: What the engine loads: full precision, or bitsandbytes at load time.
SUPPORTED_QUANTIZATIONS = ("none", "8-bit", "4-bit")


def require_supported(plan: LaunchPlan) -> None:
    """Refuse, before anything is downloaded, a plan this engine cannot load."""
    if plan.quantization not in SUPPORTED_QUANTIZATIONS:
        raise EngineUnavailableError(
            f"The Transformers engine cannot load quantization {plan.quantization}.",
            hint="Use none, 8-bit or 4-bit, or the vLLM engine.",
        )


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
        apply_pixel_shuffle(model)  # v1 checkpoints (InternVL 1.5); v2 ones are left as loaded
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

    @classmethod
    def for_plan(cls, plan: LaunchPlan, weights: Path) -> TransformersEngine:
        """The engine a plan describes: its device, dtype, quantization, stop
        strings, and the device map over its GPUs."""
        from internvl_launch.engines.device_map import device_map_for

        require_supported(plan)
        return cls(
            weights,
            device=plan.device,
            dtype=plan.dtype,
            quantization=plan.quantization,
            stop=plan.spec.stop,
            device_map=device_map_for(plan.device_map, plan.gpu_indices, weights),
        )

    @property
    def input_device(self) -> Any:
        return self.model.get_input_embeddings().weight.device

    @property
    def vision_dtype(self) -> Any:
        return next(self.model.model.vision_tower.parameters()).dtype

    # -- inputs -------------------------------------------------------------

    def encode(self, request: GenerationRequest) -> list[int]:
        if request.input_ids is not None:
            return list(request.input_ids)
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

    def _generate_kwargs(self, params: SamplingParams, max_new_tokens: int) -> dict[str, Any]:
        from transformers import LogitsProcessorList

        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.pad_id,
            "repetition_penalty": float(params.repetition_penalty),
            "logits_processor": LogitsProcessorList([_FiniteScores()]),
        }
        if params.temperature >= GREEDY_BELOW:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
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

    def run(self, rows: Sequence[Row], params: SamplingParams) -> list[Completion]:
        """Generate every row in one batch. `params` gives the shared sampling
        settings; each row stops on its own (end token, its stop strings, its
        `max_tokens`, its cancel event) and streams through its `on_text`."""
        torch = self._torch
        from transformers import StoppingCriteriaList

        started = time.perf_counter()
        input_ids, mask, pixel_values, lengths = self._batch([r.request for r in rows])
        tracker = _RowTracker(self, rows, input_ids.shape[1], started)
        with torch.inference_mode(), self._seeded(params):
            self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                stopping_criteria=StoppingCriteriaList([tracker]),
                **_pixels(pixel_values),
                **self._generate_kwargs(params, max(r.params.max_tokens for r in rows)),
            )
        return tracker.completions(lengths, time.perf_counter() - started)

    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams) -> list[Completion]:
        """Replies for several conversations, generated together."""
        return self.run([Row(r, params) for r in requests], params)

    def stream(self, request: GenerationRequest, params: SamplingParams) -> Iterator[str]:
        """Text deltas of one reply as they are generated. Text that may be the
        start of a stop string is held back until it is known not to be."""
        deltas: queue.Queue[str | BaseException | None] = queue.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                self.run([Row(request, params, on_text=deltas.put, cancel=cancel)], params)
                deltas.put(None)
            except BaseException as exc:  # re-raised in the consumer
                deltas.put(exc)

        worker = threading.Thread(target=work, name="internvl-generate", daemon=True)
        worker.start()
        try:
            while (item := deltas.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            worker.join()


#: Temperatures below this sample greedily: dividing logits by less overflows
#: float32 into infinities that no sampler can draw from.
GREEDY_BELOW = 1e-5


class _FiniteScores:
    """Logits processor that keeps one request's extreme settings from failing
    the sampler, and with it the batch it shares: a repetition penalty near
    zero divides positive logits into +inf (or into values the temperature
    then divides past float32's range). Such scores are capped where no
    temperature the engine samples with can overflow them, NaN is never
    drawn, and a row with nothing left becomes uniform. Transformers runs the
    temperature and top-p/top-k warpers after processors passed in, so the
    cap leaves room for them. One comparison on ordinary steps."""

    #: float32's largest value divided by the smallest sampling temperature, with a margin.
    CAP = 3.4e38 * GREEDY_BELOW / 4

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if bool((scores <= self.CAP).all()):  # NaN compares false: one reduction finds both
            return scores
        scores = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=self.CAP).clamp(max=self.CAP)
        dead = torch.isneginf(scores).all(dim=-1)
        if dead.any():  # nothing left to draw from: every token alike
            scores[dead] = 0.0
        return scores


@dataclass
class Row:
    """One conversation in a batch, with its own limits and its own sink."""

    request: GenerationRequest
    params: SamplingParams
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event | None = None


class _RowTracker:
    """A stopping criterion that follows every row of a batch as tokens are
    added: it decodes each row, sends new text to its sink (holding back what
    could begin a stop string) and ends the row at its end token, its stop
    strings, its `max_tokens` or its cancel event."""

    def __init__(self, engine: TransformersEngine, rows: Sequence[Row], width: int, started: float) -> None:
        self.engine = engine
        self.rows = rows
        self.width = width
        self.started = started
        n = len(rows)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.text = [""] * n
        self.sent = [0] * n
        self.reason: list[str | None] = [None] * n
        self.first_token_s: list[float | None] = [None] * n
        self.stops = [engine._stop_strings(r.params) for r in rows]
        self.watched = [r.on_text is not None or bool(stops) for r, stops in zip(rows, self.stops, strict=True)]
        self.eos = set(engine.stop_token_ids)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        torch = self.engine._torch
        newest = input_ids[:, -1].tolist()
        done = []
        for i, row in enumerate(self.rows):
            if self.reason[i] is None:
                self._advance(i, row, newest[i])
            done.append(self.reason[i] is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _advance(self, i: int, row: Row, token: int) -> None:
        if self.first_token_s[i] is None:
            self.first_token_s[i] = time.perf_counter() - self.started
        self.tokens[i].append(token)
        if token in self.eos:
            self._finish(i, row, "stop")
            return
        # Decoding every step costs a full decode per token; only rows that
        # stream or watch for stop strings need the text before they end.
        if self.watched[i]:
            text = self.engine.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            cut, hit = _cut_at_stop(text, self.stops[i])
            self.text[i] = cut
            if hit:
                self._finish(i, row, "stop")
                return
        if len(self.tokens[i]) >= row.params.max_tokens:
            self._finish(i, row, "length")
            return
        if row.cancel is not None and row.cancel.is_set():
            self._finish(i, row, "cancelled")
            return
        text = self.text[i]
        if row.on_text is not None and not text.endswith("\ufffd"):  # not in the middle of a character
            safe = len(text) - _held_back(text, self.stops[i])
            if safe > self.sent[i]:
                row.on_text(text[self.sent[i] : safe])
                self.sent[i] = safe

    def _finish(self, i: int, row: Row, reason: str) -> None:
        self.reason[i] = reason
        if not self.watched[i]:
            tokens = self.tokens[i]
            body = tokens[:-1] if tokens and tokens[-1] in self.eos else tokens
            self.text[i] = self.engine.tokenizer.decode(body, skip_special_tokens=True)
        if row.on_text is not None and len(self.text[i]) > self.sent[i]:
            row.on_text(self.text[i][self.sent[i] :])
            self.sent[i] = len(self.text[i])

    def completions(self, prompt_lengths: Sequence[int], elapsed: float) -> list[Completion]:
        out = []
        for i, row in enumerate(self.rows):
            if self.reason[i] is None:  # generate() ended the batch before this row decided
                self._finish(i, row, "length")
            timings = {"total_s": elapsed, "load_s": self.engine.load_seconds}
            if self.first_token_s[i] is not None:
                timings["first_token_s"] = self.first_token_s[i]  # type: ignore[assignment]
            out.append(
                Completion(self.text[i], self.reason[i] or "length", prompt_lengths[i], len(self.tokens[i]), timings)
            )
        return out


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
