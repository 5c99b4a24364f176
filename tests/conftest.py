import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. @triton.jit reads TRITON_INTERPRET when a function
# is defined, triton.language's own helpers included, and transformers imports triton: so set it before
# anything below imports transformers.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

import kit

# CI runs a fixed set of examples (a red CI must be reproducible); locally, HYPOTHESIS_PROFILE unset,
# every run explores new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_configure(config):
    # The Triton tests skip where triton is missing (a plain dev install); CI sets MITIGATE_REQUIRE_TRITON=1
    # so that its "interpreted kernel equals the reference" checks cannot pass by skipping.
    if os.environ.get("MITIGATE_REQUIRE_TRITON") == "1" and importlib.util.find_spec("triton") is None:
        raise pytest.UsageError("MITIGATE_REQUIRE_TRITON=1 but triton is not installed in this venv")


@pytest.fixture(autouse=True)
def _threads():
    # Small shapes: more threads only add noise and contention on 2-core CI machines.
    torch.set_num_threads(2)


@pytest.fixture
def tiny():
    return kit.tiny()


@pytest.fixture
def single(tiny):
    _, processor = tiny
    return kit.batch(processor, [kit.PROMPTS[1]], [kit.image(0)])


@pytest.fixture
def padded(tiny):
    """Three left-padded rows of different lengths; the middle one has no image."""
    _, processor = tiny
    return kit.batch(
        processor, [kit.PROMPTS[0], kit.PROMPTS[2], kit.PROMPTS[1]], [kit.image(1), None, kit.image(2)]
    )
