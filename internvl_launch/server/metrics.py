"""Prometheus metrics of one server, in a registry of its own."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "internvl_requests", "Chat requests by outcome.", ["outcome"], registry=r
        )  # exported as internvl_requests_total
        self.latency = Histogram(
            "internvl_request_latency_seconds", "Time from request to last token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "internvl_time_to_first_token_seconds",
            "Time from request to first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "internvl_queue_wait_seconds", "Time a request waited for a batch.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.media = Histogram(
            "internvl_media_seconds",
            "Time spent fetching and tiling a request's media.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("internvl_prompt_tokens", "Prompt tokens, image tokens included.", registry=r)
        self.image_tokens = Counter("internvl_image_tokens", "Image tokens in prompts.", registry=r)
        self.completion_tokens = Counter("internvl_completion_tokens", "Generated tokens.", registry=r)
        self.queue_depth = Gauge("internvl_queue_depth", "Requests running or waiting for the engine.", registry=r)
        self.batch_size = Histogram(
            "internvl_batch_size", "Requests per generate call.", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r
        )

    # hooks the batcher calls
    def queue(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def batch(self, size: int, waits: Sequence[float]) -> None:
        self.batch_size.observe(size)
        for w in waits:
            self.queue_wait.observe(w)

    def completed(self, prompt_tokens: int, image_tokens: int, completion_tokens: int, latency: float) -> None:
        """One request answered in full."""
        self.requests.labels("ok").inc()
        self.latency.observe(latency)
        self.prompt_tokens.inc(prompt_tokens)
        self.image_tokens.inc(image_tokens)
        self.completion_tokens.inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
