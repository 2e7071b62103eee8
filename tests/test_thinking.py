"""InternVL3.5's thinking mode end to end: the model cards' reasoning system
prompt, exactly, through the one prompt path; the reasoning/answer split (whole
and streamed); the server's `chat_template_kwargs.enable_thinking` and
`--enable-thinking`, with `reasoning_content` in messages and stream deltas;
`internvl chat --enable-thinking`; `load().chat(enable_thinking=True)`; the
vLLM flags; and the refusals for models without a thinking mode.

The tiny model has random weights, so replies are scripted by a fake engine
where the split is under test; one real server checks the launch flag's path."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import running_server

from internvl_launch.engines.transformers_engine import Completion
from internvl_launch.errors import ConversationError
from internvl_launch.prompt import Message, build_prompt, get_template
from internvl_launch.prompt.thinking import THINKING_SYSTEM_PROMPT, ReasoningStream, split_reasoning
from internvl_launch.registry import load_registry
from internvl_launch.request import LaunchRequest
from internvl_launch.resolver import resolve_plan

# The model cards' R1_SYSTEM_PROMPT (huggingface.co/OpenGVLab/InternVL3_5-8B, "Thinking Mode"),
# written out as the card writes it.
CARD_PROMPT = """
You are an AI assistant that rigorously follows this response protocol:

1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.

2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the answer from the think section with a newline.

Ensure that the thinking process is thorough but remains focused on the query. The final answer should be standalone and not reference the thinking section.
""".strip()

REPLY = "<think>\nThe user compares 9.11 and 9.8.\n9.8 = 9.80 > 9.11.\n</think>\n\n9.8 is greater."
REASONING = "The user compares 9.11 and 9.8.\n9.8 = 9.80 > 9.11."
ANSWER = "9.8 is greater."


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spec directory with `tiny-think`: the built-in tiny spec with `thinking: true`."""
    text = (
        Path(__file__)
        .parent.parent.joinpath("specs", "internvl-tiny.yaml")
        .read_text()
        .replace("name: internvl-tiny", "name: tiny-think")
        .replace("aliases: [tiny, internvl-tiny-random]", "aliases: []")
        .replace("    max_tiles: 12\n", "    max_tiles: 12\n    thinking: true\n")
    )
    assert "thinking: true" in text
    directory = tmp_path_factory.mktemp("think-specs")
    (directory / "tiny-think.yaml").write_text(text)
    return directory


def plan_for(specs: Path, name: str = "tiny-think") -> Any:
    from conftest import make_env

    return resolve_plan(load_registry([str(specs)]), LaunchRequest(model_name=name, engine="transformers"), make_env())


class ScriptedEngine:
    """Stands in for the Transformers engine: replies with `reply`, streamed
    in small pieces, and records the prompts it was given."""

    def __init__(self, reply: str = REPLY, piece: int = 3) -> None:
        self.reply = reply
        self.piece = piece
        self.prompts: list[str] = []

    def _pieces(self) -> list[str]:
        return [self.reply[i : i + self.piece] for i in range(0, len(self.reply), self.piece)]

    def encode(self, request: Any) -> list[int]:
        self.prompts.append(request.prompt.text)
        return list(range(len(request.prompt.text) // 4))

    def run(self, rows: Any, params: Any) -> list[Completion]:
        out = []
        for row in rows:
            for piece in self._pieces():
                if row.on_text is not None:
                    row.on_text(piece)
            out.append(
                Completion(self.reply, "stop", len(row.request.input_ids or ()), len(self._pieces()), {"total_s": 0.0})
            )
        return out

    def generate(self, requests: Any, params: Any) -> list[Completion]:
        self.prompts += [r.prompt.text for r in requests]
        return [Completion(self.reply, "stop", 10, len(self._pieces()), {"total_s": 0.0}) for _ in requests]

    def stream(self, request: Any, params: Any) -> Iterator[str]:
        self.prompts.append(request.prompt.text)
        return iter(self._pieces())


# --- the prompt ------------------------------------------------------------------


def test_the_system_prompt_is_the_model_cards_exactly() -> None:
    assert THINKING_SYSTEM_PROMPT == CARD_PROMPT
    assert "R1_SYSTEMP" not in THINKING_SYSTEM_PROMPT and "\n\n1. First" in THINKING_SYSTEM_PROMPT


def test_thinking_takes_the_default_system_message_s_place_and_nothing_else() -> None:
    template = get_template("internvl2_5")
    messages = [Message("user", ("9.11 and 9.8, which is greater?",))]
    plain = build_prompt(messages, template=template, system_message="DEFAULT").text
    think = build_prompt(messages, template=template, system_message="DEFAULT", thinking=True).text
    assert think == plain.replace("DEFAULT", CARD_PROMPT)
    assert think.startswith("<|im_start|>system\n" + CARD_PROMPT + "<|im_end|>\n<|im_start|>user\n")
    # A system message of the conversation wins, as it wins over the default (the card sets the default).
    own = [Message("system", ("Be brief.",)), *messages]
    assert build_prompt(own, template=template, system_message="DEFAULT", thinking=True).text == (
        build_prompt(own, template=template, system_message="DEFAULT").text
    )


# --- the split -------------------------------------------------------------------

SPLITS = [
    (REPLY, (REASONING, ANSWER)),
    ("plain answer, no thinking", ("", "plain answer, no thinking")),  # the model chose not to think
    ("<think>\ncut off while thin", ("cut off while thin", "")),  # max_tokens inside the thinking
    ("<think>a</think>\n\n<think>b</think>\nanswer", ("a\n\nb", "answer")),  # a second block (#1164)
    ("<think></think>\n\nanswer", ("", "answer")),
    ("<think>a</think>answer </think> again", ("a", "answer </think> again")),
    ("\n<think>a</thin", ("a</thin", "")),
    ("", ("", "")),
]


@pytest.mark.parametrize(("text", "expected"), SPLITS)
def test_split_whole_and_streamed_agree(text: str, expected: tuple[str, str]) -> None:
    assert split_reasoning(text) == expected
    rng = random.Random(text)
    for _ in range(50):
        stream = ReasoningStream()
        reasoning = answer = ""
        i = 0
        while i < len(text):
            n = rng.randint(1, 5)
            r, a = stream.feed(text[i : i + n])
            reasoning, answer, i = reasoning + r, answer + a, i + n
        r, a = stream.finish()
        assert (reasoning + r, answer + a) == expected


def test_stream_holds_back_at_most_a_tag() -> None:
    stream = ReasoningStream()
    assert stream.feed("<thi") == ("", "")
    assert stream.feed("nk>Let me see") == ("Let me see", "")
    assert stream.feed(" </th") == ("", "")  # could be the closing tag
    assert stream.feed("ink>\n\nIt is") == ("", "It is")
    assert stream.feed(" 9.8.") == ("", " 9.8.")


# --- the server (in-process, scripted replies) -------------------------------------


def app_client(specs: Path, *, name: str = "tiny-think", default: bool = False, reply: str = REPLY) -> Any:
    from fastapi.testclient import TestClient

    from internvl_launch.server.app import ServerConfig, create_app
    from internvl_launch.server.fetch import FetchPolicy, MediaFetcher
    from internvl_launch.server.service import ChatService, ServiceLimits

    engine = ScriptedEngine(reply)
    spec = plan_for(specs, name).spec
    service = ChatService(engine, spec, limits=ServiceLimits(), fetcher=MediaFetcher(FetchPolicy()), thinking=default)
    client = TestClient(create_app(service, ServerConfig(served_model_name=name, warmup=False)))
    client.engine = engine  # type: ignore[attr-defined]
    return client


def body(name: str = "tiny-think", **extra: Any) -> dict[str, Any]:
    return {"model": name, "messages": [{"role": "user", "content": "9.11 or 9.8?"}], "max_tokens": 64, **extra}


def test_server_splits_the_reply_when_a_request_asks(specs: Path) -> None:
    with app_client(specs) as client:
        r = client.post("/v1/chat/completions", json=body(chat_template_kwargs={"enable_thinking": True}))
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert message == {
            "role": "assistant",
            "content": ANSWER,
            "reasoning_content": REASONING,
            "reasoning": REASONING,
        }
        assert client.engine.prompts[-1].startswith("<|im_start|>system\n" + CARD_PROMPT + "<|im_end|>")
        usage = r.json()["usage"]
        assert usage["completion_tokens"] == len(ScriptedEngine()._pieces())  # counts the whole reply, unchanged

        off = client.post("/v1/chat/completions", json=body()).json()["choices"][0]["message"]
        assert off == {"role": "assistant", "content": REPLY}  # the launch default is off: untouched
        assert CARD_PROMPT not in client.engine.prompts[-1]


def test_launch_default_and_per_request_override(specs: Path) -> None:
    with app_client(specs, default=True) as client:
        on = client.post("/v1/chat/completions", json=body()).json()["choices"][0]["message"]
        assert on["content"] == ANSWER and on["reasoning_content"] == REASONING
        off = client.post("/v1/chat/completions", json=body(chat_template_kwargs={"enable_thinking": False}))
        assert off.json()["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
        other = client.post("/v1/chat/completions", json=body(chat_template_kwargs={"some_var": 1}))
        assert other.json()["choices"][0]["message"]["content"] == ANSWER  # other template kwargs are ignored


def test_stream_deltas_carry_reasoning_then_content(specs: Path) -> None:
    with app_client(specs, default=True) as client:
        payload = body(stream=True, stream_options={"include_usage": True})
        with client.stream("POST", "/v1/chat/completions", json=payload) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    assert reasoning == REASONING == "".join(d.get("reasoning", "") for d in deltas)
    assert "".join(d.get("content", "") for d in deltas) == ANSWER
    kinds = [("r" if "reasoning_content" in d else "c") for d in deltas[1:] if d]
    assert kinds == sorted(kinds, reverse=True)  # all reasoning first, then all content
    assert chunks[-1]["usage"]["completion_tokens"] == len(ScriptedEngine()._pieces())


def test_the_400s(specs: Path) -> None:
    with app_client(specs, name="internvl-tiny") as client:
        r = client.post(
            "/v1/chat/completions", json=body("internvl-tiny", chat_template_kwargs={"enable_thinking": True})
        )
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "thinking_not_supported"
        assert error["param"] == "chat_template_kwargs.enable_thinking" and "'internvl-tiny'" in error["message"]
        off = client.post(
            "/v1/chat/completions", json=body("internvl-tiny", chat_template_kwargs={"enable_thinking": False})
        )
        assert off.status_code == 200  # asking not to think is fine anywhere
    with app_client(specs) as client:
        for bad in ({"enable_thinking": "yes"}, {"enable_thinking": 1}, ["enable_thinking"], "on"):
            r = client.post("/v1/chat/completions", json=body(chat_template_kwargs=bad))
            assert r.status_code == 400, bad
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"].startswith("chat_template_kwargs")


# --- a real server: the launch flag ------------------------------------------------


def test_launch_enable_thinking_serves_the_split(specs: Path, tmp_path: Path) -> None:
    args = ("--specs-dir", str(specs), "--enable-thinking")
    with running_server(tmp_path, tmp_path / "cache", *args, model=("-n", "tiny-think")) as server:
        chat = {
            "model": "tiny-think",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "temperature": 0,
        }
        on = httpx.post(server.url + "/chat/completions", json=chat, timeout=60).json()
        off = httpx.post(
            server.url + "/chat/completions",
            json={**chat, "chat_template_kwargs": {"enable_thinking": False}},
            timeout=60,
        ).json()
    # Random weights: whatever the reply, the split of the same text must come back.
    message = on["choices"][0]["message"]
    assert "reasoning_content" in message and "reasoning_content" not in off["choices"][0]["message"]
    assert on["usage"]["completion_tokens"] <= 4


def test_launch_refuses_thinking_for_a_model_without_it(run_cli) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli("launch", "-n", "internvl-tiny", "--enable-thinking", "--dry-run")
    assert code == 2 and out == ""
    assert "Thinking mode is not available for internvl-tiny" in err


# --- internvl chat -------------------------------------------------------------------


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch, specs: Path) -> ScriptedEngine:
    """`internvl chat` with the scripted engine in place of a loaded model."""
    from internvl_launch.api import InternVLModel
    from internvl_launch.cli import chat_command

    engine = ScriptedEngine()
    monkeypatch.setattr(chat_command, "_load", lambda flags, max_tiles: InternVLModel(plan_for(specs), engine, 12))
    return engine


def test_chat_print_prompt_has_the_card_prompt(run_cli, specs: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli(
        "chat", "-n", "tiny-think", "--specs-dir", str(specs), "Hi", "--enable-thinking", "--print-prompt"
    )
    assert code == 0, err
    assert (
        out
        == "<|im_start|>system\n" + CARD_PROMPT + "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_json_and_plain_and_stream(run_cli, specs: Path, scripted: ScriptedEngine) -> None:  # type: ignore[no-untyped-def]
    base = ("chat", "-n", "tiny-think", "--specs-dir", str(specs), "9.11 or 9.8?", "--enable-thinking")
    code, out, err = run_cli(*base, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["answer"] == ANSWER and data["reasoning"] == REASONING
    assert scripted.prompts[-1].startswith("<|im_start|>system\n" + CARD_PROMPT)
    code, out, err = run_cli(*base)
    assert code == 0 and out == ANSWER + "\n" and REASONING in err  # NO_COLOR: plain text on stderr
    code, out, err = run_cli(*base, "--stream")
    assert code == 0 and out == ANSWER + "\n" and REASONING in err
    code, out, _ = run_cli("chat", "-n", "tiny-think", "--specs-dir", str(specs), "9.11 or 9.8?", "--json")
    assert json.loads(out)["answer"] == REPLY and "reasoning" not in json.loads(out)  # off unless asked


def test_chat_refuses_thinking_for_a_model_without_it(run_cli) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli("chat", "-n", "internvl-tiny", "Hi", "--enable-thinking", "--print-prompt")
    assert code == 2 and "Thinking mode is not available for internvl-tiny:0.01b" in err


# --- the Python API ----------------------------------------------------------------


def test_api_chat_returns_the_answer_and_the_reasoning_on_request(specs: Path) -> None:
    from internvl_launch.api import InternVLModel

    engine = ScriptedEngine()
    model = InternVLModel(plan_for(specs), engine, 12)
    assert model.chat("9.11 or 9.8?", enable_thinking=True) == ANSWER
    assert engine.prompts[-1].startswith("<|im_start|>system\n" + CARD_PROMPT)
    answer, reasoning = model.chat("9.11 or 9.8?", enable_thinking=True, return_reasoning=True)
    assert (answer, reasoning) == (ANSWER, REASONING)
    answer, reasoning, history = model.chat("q", enable_thinking=True, return_reasoning=True, return_history=True)
    assert history == [("q", ANSWER)]  # history keeps the answers
    assert model.chat("q") == REPLY.strip() and CARD_PROMPT not in engine.prompts[-1]
    result = model.chat_messages([{"role": "user", "content": "q"}], enable_thinking=True)
    assert (result.text, result.reasoning) == (ANSWER, REASONING)

    tiny = InternVLModel(plan_for(specs, "internvl-tiny"), engine, 12)
    with pytest.raises(ConversationError, match="not available for internvl-tiny"):
        tiny.chat("q", enable_thinking=True)


# --- vLLM ----------------------------------------------------------------------------


def test_vllm_flags_only_for_thinking_specs(specs: Path, tmp_path: Path) -> None:
    import jinja2

    from internvl_launch.checkpoint.tiny import chat_template
    from internvl_launch.launcher.serve import ServeOptions
    from internvl_launch.launcher.vllm import vllm_command

    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template("internvl2_5", "DEF")}))

    def flag(command: list[str], name: str) -> str:
        return command[command.index(name) + 1]

    plain = vllm_command(plan_for(specs, "internvl-tiny"), weights, ServeOptions(), 8000)
    assert not {"--reasoning-parser", "--default-chat-template-kwargs", "--chat-template"} & set(plain)

    think = plan_for(specs)
    command = vllm_command(think, weights, ServeOptions(enable_thinking=True), 8000)
    assert flag(command, "--reasoning-parser") == "qwen3"
    assert json.loads(flag(command, "--default-chat-template-kwargs")) == {"enable_thinking": True}
    off = vllm_command(think, weights, ServeOptions(), 8000)
    assert json.loads(flag(off, "--default-chat-template-kwargs")) == {"enable_thinking": False}

    template = jinja2.Environment().from_string(flag(command, "--chat-template"))
    user = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    on = template.render(messages=user, add_generation_prompt=True, enable_thinking=True)
    assert (
        on
        == "<|im_start|>system\n" + CARD_PROMPT + "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.render(messages=user, add_generation_prompt=True).startswith("<|im_start|>system\nDEF<|im_end|>")
    own = [{"role": "system", "content": "Mine."}, *user]
    assert "Mine." in template.render(messages=own, add_generation_prompt=True, enable_thinking=True)

    mine = vllm_command(think, weights, ServeOptions(vllm_args=("--reasoning-parser", "deepseek_r1")), 8000)
    assert mine.count("--reasoning-parser") == 1 and mine[-1] == "deepseek_r1"
