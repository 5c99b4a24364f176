"""The vLLM plugin's tests need vLLM's CPU build: .ci/run_vllm makes a venv with it and runs this folder.
Elsewhere (the main CI venv) each module skips itself (``pytest.importorskip("vllm")``); with
MITIGATE_REQUIRE_VLLM=1 a missing vLLM is an error instead, so the vLLM CI step cannot pass by skipping."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# no downloads; a small KV cache (GiB) on the 2-core CI machines
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def pytest_configure(config):
    if os.environ.get("MITIGATE_REQUIRE_VLLM") == "1" and importlib.util.find_spec("vllm") is None:
        raise pytest.UsageError("MITIGATE_REQUIRE_VLLM=1 but vllm is not installed in this venv")
