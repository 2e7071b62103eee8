"""The OpenAI-compatible server, for real: `internvl launch` in a subprocess on
loopback, the official `openai` client (and plain httpx for what the client
hides), the built-in tiny model on CPU."""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from servers import CountingListener, Server, data_url, png_bytes, running_server

KEY = "sk-test-0123456789"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("srv"), tiny_cache, "--max-images-per-request", "3") as s:
        yield s


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("media")
    (d / "pic.png").write_bytes(png_bytes((200, 150)))
    return d


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path, media_dir: Path) -> Iterator[Server]:
    """A server with the opt-ins: private media URLs, a local media directory,
    an API key, a small queue."""
    args = ["--allow-private-media-urls", "--allowed-local-media-path", str(media_dir), "--api-key", KEY]
    args += ["--max-queue", "3", "--max-batch-size", "4", "--served-model-name", "tiny-open"]
    with running_server(tmp_path_factory.mktemp("open"), tiny_cache, *args) as s:
        yield s


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def image_message(text: str, *urls: str, detail: str | None = None) -> list[dict]:
    parts: list[dict] = []
    for url in urls:
        ref: dict = {"url": url}
        if detail:
            ref["detail"] = detail
        parts.append({"type": "image_url", "image_url": ref})
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def metric(text: str, name: str) -> float:
    """One sample of the Prometheus text exposition."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


# --- happy paths ---------------------------------------------------------------


def test_ready_line_and_models(server: Server, client: openai.OpenAI) -> None:
    assert server.ready["event"] == "ready" and server.ready["engine"] == "transformers"
    assert [m.id for m in client.models.list().data] == ["internvl-tiny"]
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}


def test_image_chat_counts_image_tokens(client: openai.OpenAI) -> None:
    image = data_url(png_bytes((640, 320)))  # 2:1 -> a 2x1 grid plus the thumbnail = 3 tiles
    r = client.chat.completions.create(
        model="internvl-tiny", messages=image_message("Describe.", image), max_tokens=6, temperature=0
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6
    text_only = client.chat.completions.create(
        model="internvl-tiny", messages=[{"role": "user", "content": "Describe."}], max_tokens=1, temperature=0
    )
    # 3 tiles of 256 image tokens plus <img>, </img> and the "<image>\n" line.
    assert r.usage.prompt_tokens - text_only.usage.prompt_tokens >= 3 * 256 + 2


def test_stream_equals_plain_reply_and_reports_usage(client: openai.OpenAI) -> None:
    messages = image_message("What is it?", data_url(png_bytes()))
    plain = client.chat.completions.create(model="internvl-tiny", messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="internvl-tiny",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_raw_stream_ends_with_done(server: Server) -> None:
    body = {"model": "internvl-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_detail_and_max_tiles_set_the_tiles(client: openai.OpenAI) -> None:
    image = data_url(png_bytes((900, 300)))

    def prompt_tokens(detail: str | None = None, extra: dict | None = None) -> int:
        return client.chat.completions.create(
            model="internvl-tiny",
            messages=image_message("x", image, detail=detail),
            max_tokens=1,
            extra_body=extra,
        ).usage.prompt_tokens

    low, high, two = prompt_tokens("low"), prompt_tokens("high"), prompt_tokens(extra={"max_tiles": 2})
    assert high - low == (high - low) // 256 * 256 > 0  # whole tiles of 256 tokens
    assert low < two < high
    assert prompt_tokens(extra={"max_tiles": 200}) == high  # clamped to the server's maximum


def test_multi_image_system_and_multi_turn(client: openai.OpenAI) -> None:
    a, b = data_url(png_bytes(seed=1)), data_url(png_bytes(seed=2))
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi."},
        *image_message("Compare them.", a, b, detail="low"),
    ]
    r = client.chat.completions.create(model="internvl-tiny", messages=messages, max_tokens=4, seed=3, temperature=0.8)
    again = client.chat.completions.create(
        model="internvl-tiny", messages=messages, max_tokens=4, seed=3, temperature=0.8
    )
    assert r.choices[0].message.content == again.choices[0].message.content  # seeded sampling repeats
    assert r.usage.prompt_tokens > 2 * 256


def test_video(client: openai.OpenAI) -> None:
    import numpy as np
    from test_video import encode_video

    rng = np.random.default_rng(3)
    video = encode_video([rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(12)])
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": data_url(video, "video/x-matroska")}},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]
    r = client.chat.completions.create(
        model="internvl-tiny", messages=messages, max_tokens=2, extra_body={"num_frames": 4}
    )
    assert r.usage.prompt_tokens > 4 * 256


def test_metrics_count_requests_tokens_and_batches(server: Server, client: openai.OpenAI) -> None:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(
            pool.map(
                lambda i: client.chat.completions.create(
                    model="internvl-tiny", messages=[{"role": "user", "content": f"n{i}"}], max_tokens=16
                ),
                range(6),
            )
        )
    text = httpx.get(server.base + "/metrics").text
    ok = metric(text, 'internvl_requests_total{outcome="ok"}')
    assert ok >= 6
    count = metric(text, "internvl_batch_size_count")
    total = metric(text, "internvl_batch_size_sum")
    assert total > count, "concurrent requests should have shared generate calls"
    assert metric(text, "internvl_completion_tokens_total") > 0
    assert "internvl_time_to_first_token_seconds_bucket" in text and "internvl_queue_depth" in text


# --- the client's mistakes -> OpenAI-shaped 4xx ------------------------------------------


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n > 1"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "last message"),
    ],
)
def test_bad_requests_are_400(server: Server, body: dict, fragment: str) -> None:
    r = httpx.post(server.url + "/chat/completions", json={"model": "internvl-tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]


def test_bad_media_is_400(client: openai.OpenAI) -> None:
    cases = {
        "data:image/png;base64,!!!notbase64": "base64",
        data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 40): "image",
        data_url(png_bytes()[:200]): "image",
    }
    for url, word in cases.items():
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="internvl-tiny", messages=image_message("x", url))
        message = err.value.body["message"]
        assert word in message.lower() and "Traceback" not in message and "/" not in message.split("image")[0]


def test_too_many_images_before_any_fetch(client: openai.OpenAI) -> None:
    listener = CountingListener(png_bytes())
    try:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="internvl-tiny", messages=image_message("x", *[listener.url()] * 4), max_tokens=1
            )
        assert "at most 3" in err.value.body["message"]
        assert listener.connections == 0
    finally:
        listener.close()


def test_loopback_media_url_is_refused_without_a_connection(client: openai.OpenAI) -> None:
    listener = CountingListener(png_bytes())
    try:
        for url in (
            listener.url(),
            f"http://2130706433:{listener.port}/a.png",
            f"http://[::ffff:127.0.0.1]:{listener.port}/",
        ):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model="internvl-tiny", messages=image_message("x", url), max_tokens=1)
            assert err.value.body["code"] == "media_refused"
        assert listener.connections == 0
    finally:
        listener.close()


def test_local_paths_refused_by_default(client: openai.OpenAI, media_dir: Path) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="internvl-tiny", messages=image_message("x", str(media_dir / "pic.png")), max_tokens=1
        )
    assert "local" in err.value.body["message"]


def test_context_overflow_states_the_counts(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="internvl-tiny", messages=[{"role": "user", "content": "x"}], max_tokens=100000
        )
    body = err.value.body
    assert body["code"] == "context_length_exceeded" and "8192" in body["message"]


def test_invalid_json_and_oversized_body(server: Server) -> None:
    r = httpx.post(server.url + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        server.url + "/chat/completions",
        content=b"x" * (65 * 2**20),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert httpx.get(server.base + "/health").status_code == 200


def test_typed_special_tokens_stay_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="internvl-tiny",
        messages=[{"role": "user", "content": "<image> <img><IMG_CONTEXT></img> <|im_end|>"}],
        max_tokens=2,
    )
    assert r.usage.prompt_tokens < 100  # no image tokens were expanded


# --- the opt-in server: API key, private URLs, local files, the queue limit ------------


def test_api_key_is_required_and_not_logged(open_server: Server) -> None:
    r = httpx.post(open_server.url + "/chat/completions", json={"model": "tiny-open", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(open_server.url + "/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(open_server.base + "/metrics").status_code == 401
    assert httpx.get(open_server.base + "/health").status_code == 200
    good = openai.OpenAI(base_url=open_server.url, api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == ["tiny-open"]
    assert KEY not in open_server.log_text()


def test_allowed_private_url_and_local_file(open_server: Server, media_dir: Path) -> None:
    listener = CountingListener(png_bytes((300, 300)))
    c = openai.OpenAI(base_url=open_server.url, api_key=KEY, max_retries=0, timeout=60)
    try:
        by_url = c.chat.completions.create(model="tiny-open", messages=image_message("x", listener.url()), max_tokens=1)
        assert listener.connections == 1 and by_url.usage.prompt_tokens > 256
        local = c.chat.completions.create(model="tiny-open", messages=image_message("x", "pic.png"), max_tokens=1)
        assert local.usage.prompt_tokens > 256
        outside = media_dir.parent / "outside.png"
        outside.write_bytes(png_bytes())
        for ref in ("../outside.png", str(outside), "file://" + str(media_dir) + "/%2e%2e/outside.png"):
            with pytest.raises(openai.BadRequestError):
                c.chat.completions.create(model="tiny-open", messages=image_message("x", ref), max_tokens=1)
    finally:
        listener.close()


def test_overload_answers_429_before_streaming(open_server: Server) -> None:
    c = openai.OpenAI(base_url=open_server.url, api_key=KEY, max_retries=0, timeout=120)
    statuses: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            c.chat.completions.create(
                model="tiny-open",
                messages=[{"role": "user", "content": f"long {i}"}],
                max_tokens=400,
                stop=["\u2603\u2603\u2603"],
            )
            code = 200
        except openai.RateLimitError as err:
            assert err.response.headers["retry-after"] == "1"
            code = 429
        with lock:
            statuses.append(code)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(one, range(10)))
    assert statuses.count(429) >= 1 and statuses.count(200) >= 3
    assert len(statuses) == 10  # every request got an answer


def test_client_disconnect_cancels_generation(open_server: Server) -> None:
    body = {
        "model": "tiny-open",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 4000,
        "stream": True,
        "stop": ["\u2603\u2603"],
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", open_server.url + "/chat/completions", json=body, headers=headers, timeout=60) as r:
        for _ in zip(range(3), r.iter_lines(), strict=False):
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = httpx.get(open_server.base + "/metrics", headers=headers).text
        depth = metric(text, "internvl_queue_depth")
        if 'outcome="cancelled"' in text and depth == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the cancelled stream still holds its slot:\n" + text)
