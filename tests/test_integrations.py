"""Mitigation inside other tools: ``attn_implementation="mitigate"``, the ``transformers serve`` launcher,
and the lmms-eval model (loaded through lmms-eval's own registry)."""

from __future__ import annotations

import pytest
import torch
from serving import free_port, library_answer, running, user_message
from transformers import AutoModelForImageTextToText

from mitigate import get_mitigation
from mitigate.builtin import sample_image, shapes_image
from mitigate.integrations import transformers_attention
from mitigate.integrations.transformers_serve import serve_args
from mitigate.loading import load_model

PROMPT = "Is there a red circle in the image?"
PAI = {"pai": {"alpha": 1.0}}


@pytest.fixture(scope="module")
def reference():
    return load_model("builtin:tiny-llava")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, reference):
    """builtin:tiny-llava saved as a Hugging Face folder (what transformers' loaders read)."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    model, processor = reference
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def enabled():
    transformers_attention.enable("pai", alpha=1.0)
    yield
    transformers_attention.disable()


def test_attn_implementation_mitigate(saved, reference, enabled):
    model, processor = reference
    loaded = AutoModelForImageTextToText.from_pretrained(saved, attn_implementation="mitigate").eval()
    handle = get_mitigation(loaded)
    assert handle is not None and handle.methods["pai"]["alpha"] == 1.0
    assert loaded.config.vision_config._attn_implementation == "sdpa"  # as when mitigated by hand
    expected = library_answer(model, processor, PROMPT, sample_image(), PAI, 6)
    assert expected != library_answer(model, processor, PROMPT, sample_image(), None, 6)
    assert library_answer(loaded, processor, PROMPT, sample_image(), None, 6) == expected
    handle.remove()
    assert loaded.config.text_config._attn_implementation == "sdpa"
    # without the name (and without force) nothing changes
    assert get_mitigation(AutoModelForImageTextToText.from_pretrained(saved)) is None


def test_force_and_disable(saved):
    transformers_attention.enable("vaf", force=True)
    try:
        forced = AutoModelForImageTextToText.from_pretrained(saved)
        assert list(get_mitigation(forced).methods) == ["vaf"]
        get_mitigation(forced).remove()
    finally:
        transformers_attention.disable()
    assert not transformers_attention.enabled()
    assert get_mitigation(AutoModelForImageTextToText.from_pretrained(saved)) is None


def test_the_name_without_a_mitigation_refuses_to_run(reference):
    transformers_attention.register()
    try:
        model, _ = load_model("builtin:tiny-llava")
        model.set_attn_implementation("mitigate")
        with pytest.raises(RuntimeError, match="no mitigation is applied"):
            model(input_ids=torch.tensor([[2, 5, 6]]))
    finally:
        transformers_attention.unregister()
    with pytest.raises(ValueError, match="not supported"):  # the name is gone again
        load_model("builtin:tiny-llava")[0].set_attn_implementation("mitigate")


def test_launcher_arguments():
    assert serve_args(["m", "--port", "1", "--attn-implementation", "mitigate"]) == ["m", "--port", "1"]
    assert serve_args(["--attn-implementation=mitigate", "m"]) == ["m"]
    for bad in (["--compile"], ["--continuous-batching"], ["--attn-implementation", "sdpa"]):
        with pytest.raises(SystemExit, match="mitigate"):
            serve_args(["m", *bad])


@pytest.mark.slow
def test_transformers_serve_launcher(saved, reference, tmp_path):
    """HF's own server, started through the launcher, answers as the library does under the mitigation."""
    openai = pytest.importorskip("openai")
    model, processor = reference
    port = free_port()
    args = ["-m", "mitigate.integrations.transformers_serve", "--method", "pai", "--set", "alpha=1.0", "--",
            str(saved), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]  # fmt: skip
    with running(args, f"http://127.0.0.1:{port}/health", tmp_path / "transformers-serve.log"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(
            model=str(saved), messages=user_message(PROMPT, sample_image()), max_tokens=6, temperature=0
        )
    assert response.choices[0].message.content == library_answer(
        model, processor, PROMPT, sample_image(), PAI, 6
    )


def test_lmms_eval_plugin(reference):
    registry = pytest.importorskip("lmms_eval.models", reason="lmms-eval is installed by .ci/run (--no-deps)")
    from lmms_eval.api.instance import Instance

    from mitigate.integrations.lmms_eval.model import MitigatedLMM

    assert "mitigate" in registry.list_available_models()
    cls = registry.get_model("mitigate")
    assert cls is MitigatedLMM
    docs = [
        {"image": sample_image(), "question": PROMPT},
        {
            "image": shapes_image(seed=3)[0],
            "question": "What color is the square on the left of the picture?",
        },
    ]
    settings = {"max_new_tokens": 6, "until": ["clock"]}

    def requests():
        return [
            Instance(
                request_type="generate_until",
                arguments=(doc["question"], dict(settings), lambda d: [d["image"]], i, "fake", "test"),
                idx=0,
                metadata={"task": "fake", "doc_id": i, "repeats": 1},
            )
            for i, doc in enumerate(docs)
        ]

    def cut(text):
        return text[: text.find("clock")] if "clock" in text else text

    model, processor = reference
    answers = {}
    for args, spec in [("method=pai,alpha=1.0", PAI), ("method=none", None)]:
        lm = cls.create_from_arg_string(
            f"pretrained=builtin:tiny-llava,{args}", {"batch_size": 2, "device": "cpu"}
        )
        lm.task_dict = {"fake": {"test": docs}}
        answers[args] = lm.generate_until(requests())
        expected = [cut(library_answer(model, processor, d["question"], d["image"], spec, 6)) for d in docs]
        assert answers[args] == expected
    assert answers["method=pai,alpha=1.0"] != answers["method=none"]
    assert any("clock" in library_answer(model, processor, d["question"], d["image"], PAI, 6) for d in docs)
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood(requests())
