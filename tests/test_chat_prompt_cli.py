"""`internvl chat --print-prompt`: the exact prompt from flags or a messages
file, with the spec's template, system message and tiling; errors as exit codes."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

Run = Callable[..., tuple[int, str, str]]
SYS2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


def ctx(tiles: int) -> str:
    return "<img>" + "<IMG_CONTEXT>" * (256 * tiles) + "</img>"


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, size in {"wide.jpg": (800, 600), "square.png": (448, 448), "tall.webp": (100, 1000)}.items():
        path = tmp_path / name
        Image.new("RGB", size, (10, 200, 30)).save(path)
        out[name] = path
    return out


def test_single_image_internvl2_2b_exact(run_cli: Run, images: dict[str, Path]) -> None:
    code, out, err = run_cli(
        "chat",
        "-n",
        "internvl2",
        "-s",
        "2",
        "--image",
        str(images["wide.jpg"]),
        "Describe the image.",
        "--print-prompt",
    )
    assert code == 0, err
    # 800x600 at up to 12 tiles: a 4x3 grid plus the thumbnail = 13 tiles.
    assert out == (
        "<|im_start|>system\n" + SYS2 + "<|im_end|>"
        "<|im_start|>user\n" + ctx(13) + "\nDescribe the image.<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_phi3_model_and_max_tiles_and_two_images(run_cli: Run, images: dict[str, Path]) -> None:
    code, out, _ = run_cli(
        "chat",
        "-n",
        "internvl2",
        "-s",
        "4",
        "--image",
        str(images["wide.jpg"]),
        "--image",
        str(images["square.png"]),
        "--max-tiles",
        "6",
        "Compare.",
        "--print-prompt",
        "--compact-images",
    )
    assert code == 0
    # 800x600 (aspect 1.33) at up to 6 tiles: 3x2 (1.5) is closer than 2x2 (1.0); plus the thumbnail = 7.
    assert out == (
        "<|system|>\n" + SYS2 + "<|end|><|user|>\n"
        "Image-1: <img><IMG_CONTEXT>*1792</img>\nImage-2: <img><IMG_CONTEXT>*256</img>\nCompare.<|end|>"
        "<|assistant|>\n"
    )


def test_video_prompt_has_frame_prefixes(run_cli: Run, tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 64)  # the prompt only needs the frame count; decoding comes with generation
    code, out, _ = run_cli(
        "chat", "-n", "internvl3", "-s", "2", "--video", str(video), "--num-frames", "3", "What?", "--print-prompt"
    )
    assert code == 0
    assert "<|im_start|>user\nFrame1: " + ctx(1) + "\nFrame2: " + ctx(1) + "\nFrame3: " + ctx(1) + "\nWhat?" in out


def test_messages_file_with_paths_and_data_urls(run_cli: Run, images: dict[str, Path], tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (1000, 100)).save(buf, "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "model": "ignored",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What differs? <image>"},
                    {"type": "image_url", "image_url": {"url": "tall.webp"}},
                    {"type": "image_url", "image_url": {"url": data_url}},
                ],
            },
            {"role": "assistant", "content": "Their shapes."},
            {"role": "user", "content": "Say more."},
        ],
    }
    path = images["tall.webp"].parent / "conv.json"
    path.write_text(json.dumps(body))
    code, out, err = run_cli("chat", "-n", "internvl2.5", "--messages", str(path), "--print-prompt", "--json")
    assert code == 0, err
    result = json.loads(out)
    # 100x1000 (1:10) at 12 tiles -> 1x10 + thumbnail = 11; 1000x100 -> 10x1 + thumbnail = 11.
    assert result["image_blocks"] == [11, 11]
    assert result["image_tokens"] == 2 * (11 * 256 + 2)
    assert result["stop"] == ["<|im_end|>"]
    assert result["prompt"] == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nImage-1: " + ctx(11) + "\nImage-2: " + ctx(11) + "\nWhat differs? <image><|im_end|>\n"
        "<|im_start|>assistant\nTheir shapes.<|im_end|>\n"
        "<|im_start|>user\nSay more.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_system_flag_overrides(run_cli: Run) -> None:
    code, out, _ = run_cli("chat", "-n", "internvl3", "--system", "Be terse.", "Hi", "--print-prompt")
    assert code == 0
    assert out.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--image", "missing.jpg", "x"], 9, "Cannot read image missing.jpg"),
        (["--image", "data:image/png;base64,@@@", "x"], 9, "invalid base64"),
        (["--image", "data:text/plain;base64,aGk=", "x"], 9, "type text/plain"),
        (["--image", "https://example.com/a.png", "x"], 9, "remote URL"),
        (["--image", "ftp://example.com/a.png", "x"], 9, "ftp:// scheme"),
        ([], 2, "Give a question"),
        (["--messages", "m.json", "x"], 2, "--messages replaces"),
    ],
)
def test_bad_input_exit_codes(run_cli: Run, args: list[str], code: int, needle: str) -> None:
    got, _, err = run_cli("chat", "-n", "internvl2.5", *args, "--print-prompt")
    assert got == code
    assert needle in err


def test_compact_needs_print_prompt(run_cli: Run) -> None:
    got, _, err = run_cli("chat", "-n", "internvl2.5", "x", "--compact-images")
    assert got == 2 and "only applies with --print-prompt" in err


def test_bad_images_and_messages(run_cli: Run, tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    code, _, err = run_cli("chat", "-n", "internvl2.5", "--image", str(tmp_path / "junk.png"), "x", "--print-prompt")
    assert code == 9 and "not a readable image" in err
    ico = tmp_path / "a.ico"
    Image.new("RGB", (16, 16)).save(ico)
    code, _, err = run_cli("chat", "-n", "internvl2.5", "--image", str(ico), "x", "--print-prompt")
    assert code == 9 and "ICO image" in err
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user", "content": [{"type": "image_url"}]}]')
    code, _, err = run_cli("chat", "-n", "internvl2.5", "--messages", str(bad), "--print-prompt")
    assert code == 9 and "messages[0].content[0].image_url.url" in err
    bad.write_text("{")
    code, _, err = run_cli("chat", "-n", "internvl2.5", "--messages", str(bad), "--print-prompt")
    assert code == 9 and "not valid JSON" in err


def test_unknown_model_still_exit_3(run_cli: Run) -> None:
    code, _, err = run_cli("chat", "-n", "internvl9", "hi", "--print-prompt")
    assert code == 3 and "internvl9" in err


def _pty_chat(tmp_path: Path, *args: str, lines: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run `internvl chat` with a pseudo-terminal as stdin/stdout, type
    `lines` one per prompt, and return the exit code and everything shown."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERNVL_")}
    env["INTERNVL_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.Popen(
        [sys.executable, "-m", "internvl_launch", "chat", *args],
        stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True,
    )  # fmt: skip
    os.close(follower)
    shown = b""
    pending = list(lines)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                shown += chunk
                if shown.endswith(b">>> ") and pending:
                    os.write(leader, (pending.pop(0) + "\n").encode())
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return code, shown.decode(errors="replace").replace("\r\n", "\n")


def test_interactive_chat_on_a_terminal_keeps_history(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (300, 200), (0, 120, 255)).save(image)
    code, shown = _pty_chat(
        tmp_path,
        "-n", "internvl-tiny", "--max-tokens", "3",
        lines=["What is this?", "/image /no/such.png", f"/image {image}", "And now?", "/reset", "Hi", "/exit"],
    )  # fmt: skip
    assert code == 0, shown
    assert "/image PATH" in shown  # the help line
    assert "no such image: /no/such.png" in shown
    assert "(conversation cleared)" in shown
    answers = [part.split("\n", 1)[0] for part in shown.split(">>> ")[1:] if "\n" in part]
    assert len([a for a in answers if a.strip()]) >= 3  # three questions, three answers


def test_without_a_terminal_a_question_is_still_required(run_cli) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("chat", "-n", "internvl-tiny")
    assert code == 2 and "Give a question" in err


def test_interactive_rounds_carry_the_history(monkeypatch, run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from internvl_launch import api
    from internvl_launch.cli import chat_command

    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (300, 200), (0, 120, 255)).save(image)
    typed = iter(["first question", f"/image {image}", "second question", "/reset", "third question"])

    def fake_input(prompt: str) -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    seen: list[list[tuple[str, int]]] = []
    real_prepare = api.InternVLModel.prepare_messages

    def recording(self, messages, **kw):  # type: ignore[no-untyped-def]
        seen.append([(m.role, sum(not isinstance(p, str) for p in m.parts)) for m in messages])
        return real_prepare(self, messages, **kw)

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(chat_command, "_is_terminal", lambda: True)
    monkeypatch.setattr(api.InternVLModel, "prepare_messages", recording)
    code, out, err = run_cli("chat", "-n", "internvl-tiny", "--max-tokens", "2", "--system", "Be brief.")
    assert code == 0, err
    assert seen == [
        [("system", 0), ("user", 0)],
        [("system", 0), ("user", 0), ("assistant", 0), ("user", 1)],  # history, and the attached image
        [("system", 0), ("user", 0)],  # after /reset only the system message remains
    ]
    assert len(out.strip().splitlines()) == 3
