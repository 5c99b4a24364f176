"""Tensor parallelism on vLLM's CPU build (two worker processes, one head of each KV pair per rank): each rank
edits its own heads, and what mixes heads is gathered over the ranks (GIFT's head choice and saliency rows,
PAINT's CLS rows), so the numbers are the HF path's."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

import runs
import tiny_models
import torch

from mitigate.plan import HeadStage, LayerPlan, LogitStage, Rows

PROMPT = "USER: <image>\nis there a cat in the image? ASSISTANT:"
# one OpenMP thread per rank, on CPUs 0 and 1, none held back (CI machines have two cores)
THREADS = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_models.save_llava(tmp_path_factory.mktemp("tiny-llava-tp"))


@pytest.fixture(scope="module")
def llm(folder):
    saved = {name: os.environ.get(name) for name in THREADS}
    os.environ.update(THREADS)
    try:
        engine = runs.engine(folder, tensor_parallel_size=2)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    yield engine
    runs.close(engine)


@pytest.fixture(scope="module")
def hf(folder):
    return tiny_models.load_hf(folder)


@pytest.mark.parametrize("mitigation", ["pai", "var-tiny", "paint", "gift"])
def test_method_matches_hf_over_two_ranks(llm, hf, mitigation):
    got = runs.vllm_run(llm, PROMPT, tiny_models.image(0), mitigation)
    assert got.close_to(runs.hf_run(*hf, PROMPT, tiny_models.image(0), mitigation))


def test_each_rank_takes_its_heads_of_a_plan():
    from mitigate.vllm.attention import Heads

    length, on = 5, Rows.where(torch.tensor([True]), 0)
    per_head = torch.arange(4.0)[None, :, None].expand(1, 4, length)
    plan = LayerPlan.of(
        1,
        length,
        [
            LogitStage("a", on, scale=per_head.clone()),
            LogitStage("b", on, bias=torch.ones(1, 1, length)),  # shared by every head: kept whole
            HeadStage("c", on, torch.tensor([[1.0, 2.0, 3.0, 4.0]])),
        ],
    )
    local = Heads(2, 4, 4, group=object()).local(plan)
    assert local.logits[0].scale[0, :, 0].tolist() == [2.0, 3.0]
    assert local.logits[1].bias.shape == (1, 1, length)
    assert local.heads[0].scale.tolist() == [[3.0, 4.0]]
    assert Heads(0, 4, 4).local(plan) is plan
