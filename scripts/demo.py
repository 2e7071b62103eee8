"""The main job, end to end on any machine: launch the built-in model in the
background, send it a vision chat through the official `openai` client (a
generated image as base64, the answer streamed), print the answer and the
timings, stop the server.

internvl-tiny has random weights: its answer is noise. The demo shows that
the whole pipeline works - launch, tiling, prompt, batching, streaming,
process control - not what InternVL answers.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time

from openai import OpenAI
from PIL import Image, ImageDraw


def picture() -> bytes:
    img = Image.new("RGB", (800, 600), (235, 240, 250))
    draw = ImageDraw.Draw(img)
    draw.ellipse((80, 120, 380, 420), fill=(220, 60, 50))
    draw.rectangle((450, 200, 720, 470), fill=(40, 90, 200))
    draw.polygon([(400, 60), (480, 180), (320, 180)], fill=(250, 200, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def internvl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "internvl_launch", *args], capture_output=True, text=True)


def main() -> int:
    t0 = time.perf_counter()
    started = internvl("launch", "--model-name", "internvl-tiny", "--port", "0", "--detach", "--json")
    if started.returncode != 0:
        sys.stderr.write(started.stderr)
        return started.returncode
    ready = json.loads(started.stdout)
    launch_s = time.perf_counter() - t0
    print(f"launched {ready['model']} ({ready['engine']}) at {ready['url']}, pid {ready['pid']}, in {launch_s:.1f} s")
    try:
        client = OpenAI(base_url=ready["url"], api_key="not-needed")
        image = "data:image/png;base64," + base64.b64encode(picture()).decode()
        t1 = time.perf_counter()
        first = None
        pieces = []
        usage = None
        stream = client.chat.completions.create(
            model=ready["model"],
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": "What shapes are in this picture?"},
                    ],
                }
            ],
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        print("answer: ", end="", flush=True)
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    if first is None:
                        first = time.perf_counter() - t1
                    pieces.append(choice.delta.content)
                    print(choice.delta.content, end="", flush=True)
        total = time.perf_counter() - t1
        print()
        print("(internvl-tiny has random weights: the answer is noise; it shows the pipeline works)")
        if usage:
            print(f"tokens: {usage.prompt_tokens} prompt (image tiles included), {usage.completion_tokens} generated")
        print(
            f"timings: ready {ready['ready_s']:.2f} s after start; first token {first or total:.3f} s; "
            f"answer {total:.3f} s"
        )
    finally:
        stopped = internvl("stop", ready["id"])
        print(stopped.stdout.strip() or stopped.stderr.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
