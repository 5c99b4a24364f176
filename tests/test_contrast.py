"""PAI's image-free contrast (cfg_gamma): batched in one forward, equal to the explicit two-pass formula."""

import math

import kit
import pytest
import torch

from mitigate import mitigated
from mitigate.patches.contrast import contrast_scores


def image_free(inputs, image_id):
    """The prompt without its image tokens (and without pixels), unpadded."""
    ids = inputs["input_ids"][inputs["attention_mask"].bool()]
    ids = ids[ids != image_id][None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def two_pass(model, inputs, twin, gamma, cutoff, steps, alpha):
    """Greedy decoding where each step runs the PAI-edited prompt and the plain image-free prompt
    separately, then combines their log-probabilities as the formula says."""

    def step(state, token=None):
        if token is None:
            out = model(**state["inputs"], use_cache=True)
        else:
            state["mask"] = torch.cat([state["mask"], torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=state["mask"], cache=state["cache"], use_cache=True)
        state["cache"] = out.cache
        return out.logits[:, -1].float()

    cond = {"inputs": inputs, "mask": inputs["attention_mask"]}
    plain = {"inputs": twin, "mask": twin["attention_mask"]}
    tokens, scores = [], []
    token = None
    with mitigated(model, "pai", alpha=alpha, kernel="reference") as handle:
        for _ in range(steps):
            lp = torch.log_softmax(step(cond, token), -1)
            with handle.disabled():  # the image-free branch runs the plain model
                lq = torch.log_softmax(step(plain, token), -1)
            score = gamma * (lp - lq) + lq
            if cutoff is not None:
                score[lp < lp.max(-1, keepdim=True).values + math.log(cutoff)] = float("-inf")
            token = score.argmax(-1, keepdim=True)
            tokens.append(int(token))
            scores.append(score)
    return tokens, scores


@pytest.mark.parametrize(("gamma", "cutoff"), [(1.5, None), (2.0, 0.1)])
def test_contrast_equals_two_passes(tiny, gamma, cutoff):
    model, processor = tiny
    batch = kit.batch(
        processor, [kit.PROMPTS[0], kit.PROMPTS[2], kit.PROMPTS[1]], [kit.image(1), None, kit.image(2)]
    )
    steps, alpha = 5, 0.8
    with mitigated(model, "pai", alpha=alpha, cfg_gamma=gamma, cfg_cutoff=cutoff, kernel="torch"):
        out = model.generate(
            **batch, max_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    vanilla = model.generate(**batch, max_new_tokens=steps, do_sample=False)
    assert not torch.equal(out.sequences, vanilla), (
        "the contrast must change something for the test to mean it"
    )
    for row in range(3):
        single = kit.row_inputs(batch, row, processor)
        tokens, scores = two_pass(
            model, single, image_free(single, model.config.image_token_id), gamma, cutoff, steps, alpha
        )
        assert out.sequences[row, -steps:].tolist() == tokens
        for got, want in zip(out.scores, scores, strict=True):
            finite = torch.isfinite(want[0])
            assert torch.equal(finite, torch.isfinite(got[row]))
            assert (got[row][finite] - want[0][finite]).abs().max() <= 1e-4


def test_contrast_scores_formula():
    cond = torch.tensor([[2.0, 1.0, -3.0]])
    uncond = torch.tensor([[1.0, 1.0, 1.0]])
    out = contrast_scores(cond, uncond, 2.0, 0.1)
    lp, lq = torch.log_softmax(cond, -1), torch.log_softmax(uncond, -1)
    assert torch.allclose(out[0, :2], (2 * (lp - lq) + lq)[0, :2])
    assert out[0, 2] == float("-inf")  # p < 0.1 * max p
    assert torch.equal(contrast_scores(cond, cond, 1.7, None), lp)


def test_removal_restores_generation(tiny, single):
    model, _ = tiny
    before = model.generate(**single, max_new_tokens=4, do_sample=False)
    with mitigated(model, "pai-released"):
        model.generate(**single, max_new_tokens=4, do_sample=False)
    assert torch.equal(before, model.generate(**single, max_new_tokens=4, do_sample=False))
