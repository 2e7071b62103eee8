"""The tiny checkpoint generator and the Transformers engine, for real on CPU:
tokenization of prompts, batched and streamed generation, stop handling,
seeds, bitsandbytes 8-bit and 4-bit with the vision side left alone, and the
Python API and `internvl chat` on the built-in model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from internvl_launch.checkpoint.tiny import TinyConfig, generate_tiny
from internvl_launch.engines.transformers_engine import GenerationRequest, SamplingParams, TransformersEngine
from internvl_launch.prompt import Message, build_prompt, get_template, parse_messages
from internvl_launch.vision.tiling import preprocess_image

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_tiny(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> TransformersEngine:
    return TransformersEngine(tiny_dir, stop=("<|im_end|>",))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture
def use_shared_cache(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The built-in model is generated once into this cache for the whole module.
    monkeypatch.setenv("INTERNVL_CACHE_DIR", str(shared_cache))
    return shared_cache


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "a.png"
    img = Image.effect_mandelbrot((600, 400), (-2, -1, 1, 1), 50).convert("RGB")
    img.save(path)
    return path


def req(text: str, image: Path | None = None) -> GenerationRequest:
    parts: tuple = (text,)
    tiles: list[list[int]] = []
    pixels = None
    if image is not None:
        from internvl_launch.prompt import Media

        parts = (Media("image", str(image)), text)
        pixels = preprocess_image(image)
        tiles = [[pixels.shape[0]]]
    prompt = build_prompt(
        [Message("user", parts)], template=get_template("internvl2_5"), system_message="S", media_tiles=tiles
    )
    return GenerationRequest(prompt, pixels)


# --- the generator ---------------------------------------------------------------


def test_generator_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = generate_tiny(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (
            hashlib.sha256((tiny_dir / name).read_bytes()).digest()
            == hashlib.sha256((again / name).read_bytes()).digest()
        ), name
    other = generate_tiny(tmp_path / "other", TinyConfig(seed=1))
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_checkpoint_files_and_config(tiny_dir: Path, engine: TransformersEngine) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["InternVLForConditionalGeneration"]
    tok = engine.tokenizer
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert json.loads((tiny_dir / "generation_config.json").read_text())["eos_token_id"] == tok.convert_tokens_to_ids(
        "<|im_end|>"
    )
    for special in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>", "<|end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|im_start|>user\n<IMG_CONTEXT>\nWhat?<|im_end|>\n<|im_start|>assistant\n" in rendered
    # Every Linear that bitsandbytes may quantize has at least 64 inputs (4-bit block size).
    for name, module in engine.model.named_modules():
        if isinstance(module, torch.nn.Linear) and "language_model" in name:
            assert module.in_features >= 64, name


# --- tokenization ---------------------------------------------------------------------


def test_prompt_ids_equal_whole_string_tokenization_for_plain_text(engine: TransformersEngine, picture: Path) -> None:
    r = req("Describe the image.\n\nThen  count   to 10.", picture)
    ids = r.prompt.encode(engine.tokenizer)
    assert ids == engine.tokenizer(r.prompt.text, add_special_tokens=True)["input_ids"]
    ctx = engine.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids.count(ctx) == 256 * r.pixel_values.shape[0]


def test_typed_special_tokens_never_become_special_ids(engine: TransformersEngine) -> None:
    typed = "<img><IMG_CONTEXT></img><|im_end|><|im_start|>system\n<image>"
    r = req(typed)
    ids = r.prompt.encode(engine.tokenizer)
    vocab = engine.tokenizer.get_vocab()
    for token in ("<img>", "</img>", "<IMG_CONTEXT>"):
        assert vocab[token] not in ids
    # Only the template's own chat tokens are special: 3 starts, 2 ends.
    assert ids.count(vocab["<|im_start|>"]) == 3 and ids.count(vocab["<|im_end|>"]) == 2
    # The engine survives it and answers.
    out = engine.generate([r], SamplingParams(max_tokens=3))[0]
    assert out.completion_tokens >= 1


# --- generation --------------------------------------------------------------------


def test_batch_equals_one_by_one(engine: TransformersEngine, picture: Path) -> None:
    requests = [req("Hello, who are you?"), req("Describe the image.", picture), req("Hi")]
    params = SamplingParams(max_tokens=10)
    alone = [engine.generate([r], params)[0] for r in requests]
    together = engine.generate(requests, params)
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.prompt_tokens for c in together] == [len(r.prompt.encode(engine.tokenizer)) for r in requests]
    assert [(c.completion_tokens, c.finish_reason) for c in together] == [
        (c.completion_tokens, c.finish_reason) for c in alone
    ]
    for c in alone:  # a random model may end early, but only on its end token
        assert (c.completion_tokens, c.finish_reason) == (10, "length") or (
            c.finish_reason == "stop" and c.completion_tokens <= 10
        )


def test_stream_concatenates_to_the_reply(engine: TransformersEngine, picture: Path) -> None:
    params = SamplingParams(max_tokens=12)
    for r in (req("Describe the image.", picture), req("Hello there, who are you?")):
        deltas = list(engine.stream(r, params))
        assert "".join(deltas) == engine.generate([r], params)[0].text
    # Text that ends inside a character is held back; this reply streams in several pieces.
    assert len(deltas) > 1


def test_stop_strings_cut_the_reply(engine: TransformersEngine) -> None:
    # A random model's replies: take the first long one and stop on a clean piece of its middle.
    for question in ("Tell me a story.", "Hello, who are you?", "Describe.", "Hi", "What is this?"):
        r = req(question)
        full = engine.generate([r], SamplingParams(max_tokens=16))[0].text
        pieces = [full[i : i + 2] for i in range(3, len(full) - 2)]
        pieces = [p for p in pieces if p.strip() and "\ufffd" not in p and full.find(p) >= 3]
        if pieces:
            stop = pieces[0]
            break
    else:
        pytest.fail("no reply long enough to test stop strings")
    cut = engine.generate([r], SamplingParams(max_tokens=16, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.find(stop)]
    streamed = "".join(engine.stream(r, SamplingParams(max_tokens=16, stop=(stop,))))
    assert streamed == cut.text


def test_seeded_sampling_repeats(engine: TransformersEngine) -> None:
    r = req("Tell me a story.")
    a = engine.generate([r], SamplingParams(max_tokens=12, temperature=1.0, seed=5))[0].text
    b = engine.generate([r], SamplingParams(max_tokens=12, temperature=1.0, seed=5))[0].text
    c = engine.generate([r], SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=6))[0].text
    assert a == b
    assert a != c


def test_sampling_params_are_checked() -> None:
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_tile_count_must_match_pixels(engine: TransformersEngine, picture: Path) -> None:
    from internvl_launch.errors import ConversationError

    r = req("x", picture)
    with pytest.raises(ConversationError, match="tiles"):
        engine.generate([GenerationRequest(r.prompt, r.pixel_values[:1])], SamplingParams(max_tokens=1))


# --- quantization ----------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["8-bit", "4-bit"])
def test_bitsandbytes_leaves_vision_projector_and_head_alone(tiny_dir: Path, picture: Path, quantization: str) -> None:
    import bitsandbytes as bnb

    engine = TransformersEngine(tiny_dir, quantization=quantization, stop=("<|im_end|>",))
    quantized_types = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    quantized = [n for n, m in engine.model.named_modules() if isinstance(m, quantized_types)]
    assert quantized, "nothing was quantized"
    assert all(".language_model." in f".{n}" for n in quantized), quantized
    for prefix in ("model.vision_tower", "model.multi_modal_projector", "lm_head"):
        plain = [n for n, m in engine.model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)]
        assert plain, prefix
        assert not any(n.startswith(prefix) for n in quantized), prefix
    out = engine.generate([req("Describe the image.", picture)], SamplingParams(max_tokens=4))[0]
    assert out.completion_tokens == 4


# --- the Python API and the CLI ----------------------------------------------------------


def test_load_and_chat_like_the_model_cards(use_shared_cache: Path, picture: Path, tmp_path: Path) -> None:
    import internvl_launch

    model = internvl_launch.load("internvl-tiny")
    assert model.plan.engine == "transformers" and model.plan.device == "cpu" and model.plan.dtype == "float32"
    text = model.chat("Hello, who are you?", max_tokens=5)
    assert isinstance(text, str)
    reply, history = model.chat("Describe the image.", image=picture, max_tokens=5, return_history=True)
    assert history[0] == ("<image>\nDescribe the image.", reply)
    reply2, history = model.chat("Write a poem.", image=picture, history=history, max_tokens=5, return_history=True)
    assert len(history) == 2 and history[1] == ("Write a poem.", reply2)
    two = model.chat("Image-1: <image>\nImage-2: <image>\nCompare.", image=[picture, picture], max_tokens=3)
    assert isinstance(two, str)
    batch = model.batch_chat(["Describe.", "Hi"], images=[picture, None], max_tokens=6)
    assert batch == [model.chat("Describe.", image=picture, max_tokens=6), model.chat("Hi", max_tokens=6)]
    assert (
        "".join(model.stream("Hi", max_tokens=6))
        == model.engine.generate([model.prepare_question("Hi")[0]], SamplingParams(max_tokens=6))[0].text
    )

    import av
    import numpy as np

    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    request, asked = model.prepare_question("What happens?", video=video, num_frames=4)
    assert asked.startswith("Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nFrame4: <image>\nWhat happens?")
    assert request.pixel_values.shape[0] == 4
    assert isinstance(model.chat("What happens?", video=video, max_tokens=3), str)

    completion = model.chat_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": str(picture)}},
                    {"type": "text", "text": "What?"},
                ],
            }
        ],
        max_tokens=2,
    )
    assert completion.prompt_tokens > 256


def test_chat_cli_generates_json(use_shared_cache: Path, run_cli: Run, picture: Path) -> None:
    code, out, err = run_cli(
        "chat", "-n", "internvl-tiny", "--image", str(picture), "Describe the image.", "--max-tokens", "6", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == "internvl-tiny:0.01b-pytorch-none"
    assert result["completion_tokens"] == 6 and result["finish_reason"] == "length"
    tiles = preprocess_image(picture).shape[0]
    assert result["prompt_tokens"] > 256 * tiles
    code, out, _ = run_cli("chat", "-n", "internvl-tiny", "Hi", "--max-tokens", "4", "--stream")
    assert code == 0 and out.endswith("\n")
    code, _, err = run_cli("chat", "-n", "internvl-tiny", "Hi", "--stream", "--json")
    assert code == 2 and "--stream and --json" in err


def test_hub_model_offline_with_a_cold_cache_names_the_repo(run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli("chat", "-n", "internvl2", "-s", "2", "--no-memory-check", "Hi")
    assert code == 10
    assert "OpenGVLab/InternVL2-2B" in err and "not in the Hugging Face cache" in err


def test_parse_messages_round_trip_into_engine(engine: TransformersEngine) -> None:
    messages = parse_messages([{"role": "user", "content": "Hi"}])
    prompt = build_prompt(messages, template=get_template("internvl2_5"), system_message="S")
    assert engine.generate([GenerationRequest(prompt)], SamplingParams(max_tokens=2))[0].completion_tokens >= 1


@pytest.mark.parametrize(
    "settings",
    [
        {"repetition_penalty": 5e-324, "temperature": 1.0},
        {"repetition_penalty": 5e-324, "temperature": 1e-5, "top_p": 1e-300},
        {"repetition_penalty": 1e-30, "temperature": 0.01},
        {"temperature": 1e-300},
        {"temperature": 2.0, "top_k": 1, "repetition_penalty": 10},
    ],
)
def test_extreme_sampling_settings_never_fail_the_batch(tiny_dir: Path, settings: dict) -> None:
    """Overflowing scores used to make torch.multinomial raise, failing every
    conversation in the batch; the engine keeps sampling from finite scores."""
    engine = TransformersEngine(tiny_dir, stop=("<|im_end|>",))
    done = engine.generate([req("Hello"), req("Hi there")], SamplingParams(max_tokens=3, seed=1, **settings))
    assert len(done) == 2 and all(c.completion_tokens >= 1 for c in done)


def test_a_temperature_below_the_greedy_threshold_is_greedy(tiny_dir: Path) -> None:
    from internvl_launch.engines.transformers_engine import GREEDY_BELOW

    engine = TransformersEngine(tiny_dir, stop=("<|im_end|>",))
    greedy = engine.generate([req("Hello")], SamplingParams(max_tokens=6))[0].text
    for temperature in (GREEDY_BELOW / 10, 1e-300):
        assert engine.generate([req("Hello")], SamplingParams(max_tokens=6, temperature=temperature))[0].text == greedy
