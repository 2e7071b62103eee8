"""One OpenAI-client conformance suite, run against both engines through
`internvl launch`: our Transformers server, and vLLM's server supervised as a
child process (marked `vllm`; `make test-vllm` builds vLLM's CPU environment
and runs them).

Prompt token counts are checked against our own prompt builder and tiling:
each engine must see exactly the prompt InternVL's reference code would
build, image tokens included."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from servers import CountingListener, Server, data_url, png_bytes, running_server, server_env

MAX_TILES = 6


def _engine_args(engine: str) -> list[str]:
    if engine == "transformers":
        return ["--allow-private-media-urls", "--max-tiles", str(MAX_TILES)]
    python = os.environ.get("VLLM_TEST_PYTHON")
    if not python:
        pytest.fail("VLLM_TEST_PYTHON must name the vLLM environment's python (make test-vllm sets it)")
    return ["--model-engine", "vllm", "--vllm-python", python, "--max-tiles", str(MAX_TILES)]


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def engine_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    engine = request.param
    cache = tmp_path_factory.getbasetemp() / "conformance-cache"
    cache.mkdir(exist_ok=True)
    tmp = tmp_path_factory.mktemp(f"conf-{engine}")
    env = server_env(cache, tmp)
    if engine == "vllm" and os.environ.get("VLLM_TEST_PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["VLLM_TEST_PYTHONPATH"]
    with running_server(tmp, cache, *_engine_args(engine), timeout=600, env=env) as server:
        assert server.ready["engine"] == engine
        yield server


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Our own prompt builder and tiling on the same built-in checkpoint."""
    import internvl_launch

    before = os.environ.get("INTERNVL_CACHE_DIR")
    os.environ["INTERNVL_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "conformance-cache")
    try:
        return internvl_launch.load("internvl-tiny", max_tiles=MAX_TILES)
    finally:
        if before is None:
            del os.environ["INTERNVL_CACHE_DIR"]
        else:
            os.environ["INTERNVL_CACHE_DIR"] = before


@pytest.fixture
def client(engine_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine_server.url, api_key="unused", max_retries=0, timeout=120)


def expected_tokens(reference: object, messages: list[dict]) -> int:
    request = reference.prepare_messages(messages)  # type: ignore[attr-defined]
    return len(reference.engine.encode(request))  # type: ignore[attr-defined]


def user(*parts: dict | str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_models(client: openai.OpenAI) -> None:
    assert "internvl-tiny" in [m.id for m in client.models.list().data]


def test_image_chat_sees_the_exact_prompt(client: openai.OpenAI, reference: object) -> None:
    messages = [user(image(data_url(png_bytes((800, 600)))), "Describe the image.")]
    r = client.chat.completions.create(model="internvl-tiny", messages=messages, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == expected_tokens(reference, messages)
    assert r.usage.prompt_tokens > 7 * 256  # 6 tiles + thumbnail of 256 tokens each
    assert r.usage.completion_tokens <= 4 and r.choices[0].finish_reason in ("stop", "length")


def test_text_greedy_reply_matches_our_engine(client: openai.OpenAI, reference: object) -> None:
    messages = [{"role": "user", "content": "Hello there, who are you?"}]
    r = client.chat.completions.create(model="internvl-tiny", messages=messages, max_tokens=8, temperature=0)
    ours = reference.chat_messages(messages, max_tokens=8)  # type: ignore[attr-defined]
    assert r.usage.prompt_tokens == ours.prompt_tokens
    assert r.usage.completion_tokens == ours.completion_tokens
    assert r.choices[0].message.content.replace("\ufffd", "") == ours.text.replace("\ufffd", "")


def test_stream_matches_plain(client: openai.OpenAI) -> None:
    messages = [user(image(data_url(png_bytes())), "What is it?")]
    plain = client.chat.completions.create(model="internvl-tiny", messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="internvl-tiny",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_multi_image_system_multi_turn(client: openai.OpenAI, reference: object) -> None:
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        user(image(data_url(png_bytes(seed=1))), image(data_url(png_bytes((500, 200), seed=2))), "Compare."),
    ]
    r = client.chat.completions.create(model="internvl-tiny", messages=messages, max_tokens=2)
    assert r.usage.prompt_tokens == expected_tokens(reference, messages)


def test_url_image_on_loopback(client: openai.OpenAI, reference: object) -> None:
    body = png_bytes((300, 300))
    listener = CountingListener(body)
    try:
        r = client.chat.completions.create(
            model="internvl-tiny", messages=[user(image(listener.url()), "x")], max_tokens=2
        )
        assert listener.connections >= 1
        assert r.usage.prompt_tokens == expected_tokens(reference, [user(image(data_url(body)), "x")])
    finally:
        listener.close()


def test_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[user("x")], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="internvl-tiny", messages=[user(image("data:image/png;base64,!!!"), "x")], max_tokens=2
        )
    assert client.models.list().data  # still serving


def test_ready_record(engine_server: Server) -> None:
    assert engine_server.ready["url"].startswith("http://127.0.0.1:") and Path(engine_server.log).exists()


def test_video(client: openai.OpenAI) -> None:
    import numpy as np
    from test_video import encode_video

    rng = np.random.default_rng(3)
    video = encode_video([rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(12)])
    part = {"type": "video_url", "video_url": {"url": data_url(video, "video/x-matroska")}}
    r = client.chat.completions.create(model="internvl-tiny", messages=[user(part, "What happens?")], max_tokens=2)
    assert r.usage.prompt_tokens > 8 * 256  # one 256-token tile per sampled frame (at least 8)
