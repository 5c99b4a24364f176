"""Test-environment shim (CI only): lets the index's torchvision 0.28.0 import beside torch 2.13.0+cpu.

Why: vLLM's LLaVA loader imports a transformers helper whose module imports torchvision; the index only has
torchvision's CUDA build, whose compiled ops (``_C.so``) need ``libtorch_cuda.so`` and fail to load beside the
CPU torch. torchvision swallows that failure, then registers fake kernels for ``nms`` and ``qnms`` without
checking that the ops exist, which raises ``operator torchvision::nms does not exist``. Defining the two op
schemas first lets the import succeed. The ops get no kernel, so calling them raises instead of computing
anything; vLLM's LLaVA and Qwen2-VL paths only use torchvision's pure-Python transforms.

Users do not need this: GPU installs of vLLM come with a matching torchvision.
"""

import contextlib

import torch

_LIB = torch.library.Library("torchvision", "FRAGMENT")  # kept alive for the whole process
for _schema in (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
):
    with contextlib.suppress(RuntimeError):  # already defined: a working torchvision build loaded its ops
        _LIB.define(_schema)
