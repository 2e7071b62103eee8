"""Transformers-engine figures at full model size with random weights:
InternVL2-2B's real architecture (InternViT-300M + InternLM2-1.8B: 24 layers,
hidden 2048, 16 heads, 8 KV heads, vocabulary 92,553) generated in the
original layout, converted by our converter, then loaded in each quantization
and run at batch 1 and 16 (one 448-pixel image per conversation).

    python benchmarks/bench_gpu.py                    # CUDA when present: bf16, 8-bit, 4-bit
    python benchmarks/bench_gpu.py --arch tiny --device cpu   # a seconds-long run of the same code on CPU

For each quantization: load seconds, memory after loading and at the peak
(CUDA: torch's allocator; CPU: the process's peak RSS), and generated tokens
per second at each batch size (the sum of the completions' tokens over the
wall time of one batched generate call, after a warm-up call). Random weights
rarely emit the end token, so completions run to --max-tokens; the tokens
actually generated are what is counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ARCHS: dict[str, dict[str, Any]] = {
    "internvl2-2b": {
        "backbone": "internlm2",
        "vision_style": "300m",
        "vision_hidden": 1024,
        "vision_layers": 24,
        "vision_heads": 16,
        "vision_intermediate": 4096,
        "text_hidden": 2048,
        "text_layers": 24,
        "text_heads": 16,
        "text_kv_heads": 8,
        "text_intermediate": 8192,
        "model_vocab": 92553,
        "dtype": "bfloat16",
    },
    "tiny": {"backbone": "internlm2"},
}


def _memory_mib(device: str) -> tuple[float, float]:
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak, peak


def measure(path: Path, device: str, quantization: str, batches: list[int], max_tokens: int) -> dict[str, Any]:
    import torch
    from PIL import Image

    from internvl_launch.engines.transformers_engine import GenerationRequest, SamplingParams, TransformersEngine
    from internvl_launch.prompt import Media, Message, build_prompt, get_template
    from internvl_launch.vision.tiling import preprocess_image

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dtype = "bfloat16" if device == "cuda" else "float32"
    engine = TransformersEngine(path, device=device, dtype=dtype, quantization=quantization, stop=("<|im_end|>",))
    loaded_mib, _ = _memory_mib(device)
    pixels = preprocess_image(Image.new("RGB", (448, 448), (40, 120, 200)), max_tiles=1)
    prompt = build_prompt(
        [Message("user", (Media("image", "x.png"), "Describe the image in detail."))],
        template=get_template("internlm2-chat"),
        system_message="You are a helpful assistant.",
        media_tiles=[[pixels.shape[0]]],
    )
    params = SamplingParams(max_tokens=max_tokens)
    engine.generate([GenerationRequest(prompt, pixels)], SamplingParams(max_tokens=4))  # warm-up
    rates: dict[str, Any] = {}
    for batch in batches:
        requests = [GenerationRequest(prompt, pixels) for _ in range(batch)]
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        done = engine.generate(requests, params)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = sum(c.completion_tokens for c in done)
        rates[f"batch_{batch}"] = {
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
        }
    _, peak_mib = _memory_mib(device)
    result = {
        "quantization": quantization,
        "dtype": dtype,
        "load_s": round(engine.load_seconds, 2),
        "memory_after_load_mib": round(loaded_mib, 1),
        "peak_memory_mib": round(peak_mib, 1),
        **rates,
    }
    del engine
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="internvl2-2b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--quantizations", default="none,8-bit,4-bit")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    from internvl_launch.checkpoint.convert import convert
    from internvl_launch.checkpoint.tiny_original import TinyOriginalConfig, generate_tiny_original

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        start = time.perf_counter()
        original = generate_tiny_original(root / "original", TinyOriginalConfig(**ARCHS[args.arch]))
        report = convert(original, root / "native", verify=False)
        prepared = time.perf_counter() - start
        shutil.rmtree(original)
        runs = [
            measure(root / "native", device, q, [int(b) for b in args.batches.split(",")], args.max_tokens)
            for q in args.quantizations.split(",")
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "arch": args.arch,
        "parameters": report.parameters,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "generate_and_convert_s": round(prepared, 1),
        "max_tokens": args.max_tokens,
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['arch']}: {result['parameters']:,} parameters on {result['device']} (torch {result['torch']})")
        for run in runs:
            rates = ", ".join(f"{k}: {v['tokens_per_s']} tok/s" for k, v in run.items() if k.startswith("batch_"))
            print(
                f"  {run['quantization']:6} {run['dtype']:9} load {run['load_s']} s, "
                f"memory {run['memory_after_load_mib']} MiB (peak {run['peak_memory_mib']} MiB); {rates}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
