"""Peak memory of one prefill attention call at T = 4096 with VAR active, each probe in a fresh process."""

import json
import os
import subprocess
import sys

import pytest

SEQ, HEADS, DIM = 4096, 8, 64


def probe(kernel: str, text_after: int = 40) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed buffers go back to the OS at once
    cmd = [sys.executable, "-m", "mitigate.kernels.bench", "--kernel", kernel, "--seq", str(SEQ)]
    cmd += ["--heads", str(HEADS), "--head-dim", str(DIM), "--text-after", str(text_after)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


@pytest.mark.slow
def test_torch_kernel_stays_near_sdpa_memory_and_reference_does_not():
    vanilla = probe("vanilla")
    few_rows = probe("torch", text_after=40)  # a question after the image: materialised/grouped rows
    many_rows = probe("torch", text_after=3000)  # most rows edited: grouped partial states
    reference = probe("reference")
    assert few_rows <= 1.3 * vanilla, (few_rows, vanilla)
    assert many_rows <= 1.3 * vanilla, (many_rows, vanilla)
    assert reference >= vanilla + 0.9 * HEADS * SEQ * SEQ * 4, (reference, vanilla)
