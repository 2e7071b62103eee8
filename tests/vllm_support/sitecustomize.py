"""Test infrastructure for the vLLM CPU environment only (put on PYTHONPATH
by `make test-vllm`, never shipped): PyPI's torchvision is built for CUDA
torch, so its C++ operators are missing next to CPU torch and its import
fails where it registers fake kernels for them. Declaring the operator
schemas it touches (no kernels) lets `import torchvision` succeed; vLLM's
InternVL path never calls them."""

try:
    import torch

    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define(
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    )
except Exception:  # an environment where torchvision's own operators exist
    pass
