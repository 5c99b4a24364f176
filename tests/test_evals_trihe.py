"""Tri-HE end to end against a fake OpenAI-compatible server started here on 127.0.0.1: scripted extraction
and judge replies (a malformed one, a 429 then success), metrics checked against values computed by hand,
judge errors reported and never scored, a rerun served from the cache; the local NLI judge on a tiny random
cross-encoder; ``mitigate eval trihe`` and ``mitigate report`` on builtin:tiny-llava."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import typer
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
from trihe_fixtures import DATA, YES, FakeOpenAI, closed_port_url, generic, request_kind, write_trihe
from typer.testing import CliRunner

from mitigate.evals.cli import register
from mitigate.evals.jsonl import read_jsonl
from mitigate.evals.judge import (
    ClaimItem,
    JudgeConfig,
    JudgeSetupError,
    MalformedReply,
    NLIJudge,
    parse_json_reply,
    parse_triplets,
    parse_verdict,
)
from mitigate.evals.trihe import TriheTask, load_questions

runner = CliRunner()
KEY = "test-key-123"


@pytest.fixture(autouse=True)
def _setup(monkeypatch, tmp_path_factory):
    torch.set_num_threads(1)
    monkeypatch.setenv("MITIGATE_CACHE", str(tmp_path_factory.getbasetemp() / "mitigate-cache"))
    monkeypatch.setenv("MITIGATE_JUDGE_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


def invoke(app, *args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


# --------------------------------------------------------------------------------- the scripted judge

ANSWERS = {
    ("1001", 0): "The man holds a pen and a cup.",
    ("1001", 1): "The laptop is black.",
    ("1001", 2): "The desk is wooden.",
    ("1002", 0): "A woman in a hat rides a horse on the beach.",
    ("1002", 1): "I cannot tell.",
    ("1002", 2): "There is a dog next to the horse.",
    ("1003", 0): "",
    ("1003", 1): "The sky is blue.",
    ("1003", 2): "Purple elephants dance.",
}
# Replies in the order the requests come for one answer or claim (a retry after a malformed reply, or a
# resend after a 429, asks again about the same thing). 429 stands for "rate limited, retry after 0 s".
EXTRACTIONS = {
    "The man holds a pen and a cup.": ['[["man", "holding", "pen"], ["man", "holding", "cup"]]'],
    "The laptop is black.": ["Sure! The triplet is (laptop, is, black).", '[["laptop", "is", "black"]]'],
    "The desk is wooden.": ['[["desk", "is", "wooden"]]'],
    "A woman in a hat rides a horse on the beach.": [
        '```json\n[["woman", "riding", "horse"], ["horse", "on", "beach"], ["woman", "wearing", "hat"]]\n```'
    ],
    "I cannot tell.": ["[]"],
    "There is a dog next to the horse.": ['Here you go: [["dog", "next to", "horse"]]'],
    "The sky is blue.": ['[["sky", "is", "blue"]]'],
    "Purple elephants dance.": ["(elephants, dance, purple)", "elephants dance"],  # malformed twice
}
VERDICTS = {
    ("man", "holding", "pen"): [YES],
    ("man", "holding", "cup"): ['{"verdict": "no", "error": "object"}'],
    ("laptop", "is", "black"): ['Verdict:\n```\n{"verdict": "yes", "error": null}\n```'],
    ("desk", "is", "wooden"): [YES],
    ("woman", "riding", "horse"): [429, YES],
    ("horse", "on", "beach"): ['{"verdict": "no", "error": "relation"}'],
    ("woman", "wearing", "hat"): ['{"verdict": "maybe"}', "I think not."],  # malformed twice
    ("dog", "next to", "horse"): ['{"verdict": "No", "error": "object1"}'],  # the released prompt's name
    ("sky", "is", "blue"): ['{"verdict": "no"}', '{"verdict": "no", "error": null}'],  # no category, twice
}
EXPECTED = {
    # rated questions (hallucinated / judged claims): 1001: 1/2, 0/1, 0/1; 1002: 1/2 (relation; one judge
    # error), 1/1 (object). Unrated: 1002/1 (no claim), 1003/0 (empty), 1003/1 (its only claim a judge
    # error), 1003/2 (extraction malformed twice).
    "hallu_q": (0.5 + 0 + 0 + 0.5 + 1) / 5,
    "hallu_i": (0.5 / 3 + 1.5 / 2) / 2,
    "object_hallu_q": (0.5 + 1) / 5,
    "object_hallu_i": (0.5 / 3 + 1 / 2) / 2,
    "relation_hallu_q": 0.5 / 5,
    "relation_hallu_i": (0 + 0.5 / 2) / 2,
    "claims_per_question": 9 / 9,
    "judge_error_rate": 2 / 9,
}
EXPECTED_CALLS = 10 + 12  # extraction 1+2+1+1+1+1+0+1+2, judging 1+1+1+1+2+1+2+1+2


def scripted():
    seen: Counter = Counter()

    def script(body):
        kind, payload, _ = request_kind(body)
        key = (kind, payload if kind == "extract" else tuple(json.loads(payload)))
        replies = EXTRACTIONS.get(payload) if kind == "extract" else VERDICTS.get(key[1])
        if replies is None or seen[key] >= len(replies):
            return 400, f"unscripted request {key}"
        reply = replies[seen[key]]
        seen[key] += 1
        if reply == 429:
            return 429, "slow down", {"Retry-After": "0"}
        return 200, reply

    return script


def write_answers(path: Path) -> Path:
    rows = []
    for image_id, entry in DATA.items():
        for index, instance in enumerate(entry["instance"]):
            rows.append({"image_id": int(image_id), "question": instance["question"],
                         "text": ANSWERS[(image_id, index)]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))  # order must not matter
    return path


def test_score_trihe_against_a_fake_server(app, tmp_path):
    data, _ = write_trihe(tmp_path, images=False)
    answers = write_answers(tmp_path / "answers.jsonl")
    out = tmp_path / "metrics.json"
    with FakeOpenAI(scripted(), key=KEY) as server:
        args = ["score", "trihe", "--data", data, "--answers", answers, "--out", out, "--no-progress",
                "--judge-url", server.url, "--judge-model", "judge-1", "--judge-concurrency", 3]  # fmt: skip
        result = invoke(app, *args)
        assert server.calls == EXPECTED_CALLS
        assert server.statuses[429] == 1  # ... and the request after it succeeded
        metrics = json.loads(out.read_text())["metrics"]
        assert metrics == pytest.approx(EXPECTED)
        assert "2 judge errors" in " ".join(result.output.split())

        info = json.loads(out.read_text())["task_info"]
        assert info["counts"] == {
            "questions": 9, "questions_rated": 5, "questions_without_claims": 2,
            "questions_extraction_error": 1, "questions_all_claims_judge_error": 1,
            "images": 3, "images_rated": 2, "claims": 9, "claims_judged": 7, "claims_judge_error": 2,
        }  # fmt: skip
        assert info["judge"]["kind"] == "llm" and info["judge"]["model"] == "judge-1"

        records = {r["sample_id"]: r for r in read_jsonl(tmp_path / "metrics.samples.jsonl")}
        hat = records["1002/0"]["claims"][2]
        assert hat["claim"] == ["woman", "wearing", "hat"] and hat["verdict"] is None
        assert "malformed reply twice" in hat["judge_error"] and hat["replies"] == [
            '{"verdict": "maybe"}',
            "I think not.",
        ]
        assert records["1003/2"]["status"] == "extraction_error"
        assert records["1003/1"]["status"] == "judge_errors" and records["1003/1"]["hallu"] is None
        assert records["1002/1"]["status"] == "no_claims" and records["1003/0"]["status"] == "no_claims"
        assert records["1002/2"]["claims"][0]["error"] == "object"

        cache = tmp_path / "metrics.judge_cache.jsonl"
        assert KEY not in cache.read_text()  # the key never reaches the cache
        # A rerun is served from the cache: zero calls, the same numbers.
        out.unlink()
        invoke(app, *args)
        assert server.calls == EXPECTED_CALLS
        assert json.loads(out.read_text())["metrics"] == pytest.approx(EXPECTED)


def test_judge_setup_problems_are_clear_errors(app, tmp_path, monkeypatch):
    data, _ = write_trihe(tmp_path, images=False)
    answers = write_answers(tmp_path / "answers.jsonl")
    result = invoke(app, "score", "trihe", "--data", data, "--answers", answers, code=2)
    assert "--judge-model is needed" in result.output
    monkeypatch.setenv("MITIGATE_JUDGE_API_KEY", "wrong")
    with FakeOpenAI(scripted(), key=KEY) as server:
        result = invoke(app, "score", "trihe", "--data", data, "--answers", answers, "--no-progress",
                        "--judge-url", server.url, "--judge-model", "m", code=2)  # fmt: skip
    assert "HTTP 401" in result.output and "MITIGATE_JUDGE_API_KEY" in result.output
    with FakeOpenAI(scripted(), key=KEY) as server:
        result = invoke(app, "score", "trihe", "--data", data, "--answers", answers, "--no-progress",
                        "--judge-url", server.url + "/nope", "--judge-model", "m", code=2)  # fmt: skip
    assert "404" in result.output and "--judge-url" in result.output
    monkeypatch.setenv("MITIGATE_JUDGE_API_KEY", KEY)
    with FakeOpenAI(lambda body: (400, "unknown parameter: temperature"), key=KEY) as server:
        result = invoke(app, "score", "trihe", "--data", data, "--answers", answers, "--no-progress",
                        "--judge-url", server.url, "--judge-model", "o9", "--judge-concurrency", 1,
                        code=2)  # fmt: skip
        assert server.calls <= 4  # an endpoint that takes no request stops the run (8 extractions here)
    assert "rejected the first 3 requests" in " ".join(result.output.split())
    answers.write_text(answers.read_text().split("\n", 1)[1])  # one answer missing
    result = invoke(app, "score", "trihe", "--data", data, "--answers", answers, "--judge-model", "m", code=2)
    assert "1 question(s) have no answer" in result.output


def test_a_judge_url_without_http_or_a_host_is_refused_at_once():
    for bad in ["localhost:8000/v1", "api.openai.com/v1", "http://", "ftp://host/v1", "http://host:port/v1"]:
        with pytest.raises(JudgeSetupError, match="not an http:// or https:// URL with a host"):
            JudgeConfig(url=bad, model="m")
    assert JudgeConfig(url=" http://127.0.0.1:8000/v1/ ", model="m").url == "http://127.0.0.1:8000/v1"


def test_an_unreachable_endpoint_is_a_setup_error_after_a_few_tries(tmp_path, monkeypatch):
    """Nothing listens at the URL: the first requests fail to connect and the scoring stops with a clear
    error (as when the endpoint rejects its first requests), instead of retrying every claim seven times
    and recording each as a judge error."""
    import httpx

    from mitigate.evals.trihe import Scorer

    tries = Counter()
    post = httpx.AsyncClient.post

    async def counted(self, url, **kw):
        tries[url] += 1
        return await post(self, url, **kw)

    monkeypatch.setattr(httpx.AsyncClient, "post", counted)
    docs = load_questions(write_trihe(tmp_path, images=False)[0])
    url = closed_port_url()
    judge = JudgeConfig(url=url, model="m", concurrency=1, backoff=0.0)
    with pytest.raises(JudgeSetupError, match=f"the judge endpoint {url} cannot be reached .*ConnectError"):
        Scorer(judge, progress=False).score([(d, "The man holds a pen.") for d in docs])
    assert sum(tries.values()) == 3  # not 7 tries for each of the 9 answers
    with pytest.raises(JudgeSetupError, match="cannot be reached"):
        judge.probe()
    with FakeOpenAI(generic()) as server:  # any HTTP answer to the probe will do (this server has no GET)
        JudgeConfig(url=server.url, model="m").probe()
        assert server.calls == 0


def test_eval_trihe_checks_the_judge_before_generating(app, tmp_path, monkeypatch):
    from transformers import GenerationMixin

    def generate(*args, **kwargs):
        raise AssertionError("generate() was called before the judge was checked")

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    data, images = write_trihe(tmp_path)
    result = invoke(app, "eval", "trihe", "--model", "builtin:tiny-llava", "--data", data, "--image-root",
                    images, "--no-progress", "--out", tmp_path / "run", "--judge-url", closed_port_url(),
                    "--judge-model", "m", code=2)  # fmt: skip
    assert "cannot be reached" in result.output and "--judge-url" in result.output
    assert not (tmp_path / "run" / "predictions.jsonl").exists()


def test_nothing_rated_is_reported_with_the_real_counts_and_the_first_error(app, tmp_path):
    """Every answer was generated, every extraction reply was unreadable: the message says so (not "all 0
    failed; see errors.jsonl", which is empty) and names the first error."""
    data, images = write_trihe(tmp_path)
    out = tmp_path / "run"
    with FakeOpenAI(lambda body: (200, "no JSON here")) as server:
        result = invoke(app, "eval", "trihe", "--model", "builtin:tiny-llava", "--data", data, "--image-root",
                        images, "--max-new-tokens", 6, "--no-progress", "--out", out, "--judge-url",
                        server.url, "--judge-model", "m", code=2)  # fmt: skip
    text = " ".join(result.output.split())
    results = json.loads((out / "results.json").read_text())
    counts = results["task_info"]["counts"]
    assert results["n_scored"] == 9 and results["n_errors"] == 0 and counts["questions_rated"] == 0
    assert "no sample could be scored: 9 of 9 answered, none could be rated" in text
    assert f"{counts['questions_extraction_error']} with an extraction error" in text
    assert counts["questions_extraction_error"] > 0 and "the first error: question 1001/" in text
    assert "malformed reply twice" in text and "samples.jsonl" in text and "all 0 failed" not in text


def test_a_run_folder_refuses_another_judge_and_resumes_the_same(app, tmp_path):
    """Scoring into a folder with another judge model would overwrite its results: refused, as any other
    settings change. The same judge model at another URL is the same scoring: the run resumes."""
    data, images = write_trihe(tmp_path)
    out = tmp_path / "run"
    args = ["eval", "trihe", "--model", "builtin:tiny-llava", "--data", data, "--image-root", images,
            "--max-new-tokens", 6, "--no-progress", "--out", out]  # fmt: skip
    with FakeOpenAI(generic()) as one, FakeOpenAI(generic()) as two:
        invoke(app, *args, "--judge-url", one.url, "--judge-model", "A")
        before = (out / "results.json").read_text()
        result = invoke(app, *args, "--judge-url", one.url, "--judge-model", "B", code=2)
        text = " ".join(result.output.split())
        assert "holds another run (trihe, vanilla)" in text
        assert "scoring.judge_model ('A' there, 'B' here)" in text and "Give it its own --out" in text
        assert (out / "results.json").read_text() == before
        invoke(app, *args, "--judge-url", two.url, "--judge-model", "A")
        assert two.calls > 0  # the reply cache is keyed by the URL: replies from one are not reused
    assert json.loads((out / "results.json").read_text())["task_info"]["judge"]["model"] == "A"


def test_server_errors_are_retried_and_then_recorded(tmp_path):
    """A 503 is retried with backoff; one that never ends becomes a judge error (not cached), not a crash."""
    from mitigate.evals.judge import JudgeConfig
    from mitigate.evals.trihe import Scorer

    docs = load_questions(write_trihe(tmp_path, images=False)[0])
    attempts: Counter = Counter()

    def script(body):
        kind, payload, _ = request_kind(body)
        attempts[payload] += 1
        if kind == "extract":
            return 200, '[["man", "holding", "pen"], ["man", "holding", "cup"]]'
        if "cup" in payload:
            return 503, "overloaded", {"Retry-After": "0"}
        return (503, "busy", {"Retry-After": "0"}) if attempts[payload] == 1 else (200, YES)

    with FakeOpenAI(script) as server:
        judge = JudgeConfig(url=server.url, model="m", cache=tmp_path / "cache.jsonl", max_retries=2)
        records = Scorer(judge, progress=False).score([(docs[0], "some answer")])
    (record,) = records
    assert [c["verdict"] for c in record["claims"]] == ["yes", None]
    assert (
        "HTTP 503" in record["claims"][1]["judge_error"]
        and "after 3 tries" in record["claims"][1]["judge_error"]
    )
    assert record["hallu"] == 0.0 and record["n_judge_errors"] == 1
    assert attempts['["man", "holding", "pen"]'] == 2 and attempts['["man", "holding", "cup"]'] == 3
    assert (
        len((tmp_path / "cache.jsonl").read_text().splitlines()) == 2
    )  # extraction + pen; the failure is not


def test_reply_parsing_is_json_only():
    assert parse_json_reply('```json\n[["a", "b", "c"]]\n```') == [["a", "b", "c"]]
    assert parse_json_reply('The answer: {"verdict": "yes", "error": null}. Done.') == {
        "verdict": "yes",
        "error": None,
    }
    for bad in ["", "   ", "__import__('os').getcwd()", "(a, b, c)", "[['a', 'b', 'c']]", "{verdict: yes}"]:
        with pytest.raises(MalformedReply):
            parse_json_reply(bad)
    assert parse_triplets("[]") == []
    assert parse_triplets('[["cars", "count", 2]]') == [["cars", "count", "2"]]
    for bad in ['[["a", "b"]]', '[["a", "", "c"]]', '{"a": 1}', '[["a", null, "c"]]']:
        with pytest.raises(MalformedReply):
            parse_triplets(bad)
    assert parse_verdict('{"verdict": " Yes. ", "error": "object"}') == ("yes", None)
    assert parse_verdict('{"verdict": "no", "error": "Predicate"}') == ("no", "relation")
    assert parse_verdict('{"verdict": "no", "error": "object2"}') == ("no", "object")
    for bad in ['{"verdict": "no", "error": null}', '{"verdict": "unsure"}', '["yes"]']:
        with pytest.raises(MalformedReply):
            parse_verdict(bad)


def test_hallu_i_weights_and_report_metrics_agree():
    """Hallu-I from the weighted stat sums equals the plain mean over images of the per-image means."""
    from mitigate.evals.judge import Verdict
    from mitigate.evals.trihe import question_record, with_image_weights

    docs = load_questions_from(DATA)
    outcomes = [["yes", "no"], ["no"], ["yes"], ["yes", "yes", "no"], [], ["no", "no"], ["yes"], ["no"], []]
    records = []
    for doc, verdicts in zip(docs, outcomes, strict=True):
        claims = [["s", "p", str(i)] for i in range(len(verdicts))]
        vs = [Verdict(v, "relation" if v == "no" else None) for v in verdicts]
        records.append(question_record(doc, "text", claims, vs))
    records = with_image_weights(records)
    per_image: dict[str, list[float]] = {}
    for r in records:
        if r["hallu"] is not None:
            per_image.setdefault(r["image_id"], []).append(r["hallu"])
    metrics = TriheTask.aggregate(records)
    means = [sum(v) / len(v) for v in per_image.values()]
    assert metrics["hallu_i"] == pytest.approx(sum(means) / len(means))
    rated = [r["hallu"] for r in records if r["hallu"] is not None]
    assert metrics["hallu_q"] == pytest.approx(sum(rated) / len(rated))
    assert metrics["relation_hallu_i"] == pytest.approx(metrics["hallu_i"]) and metrics["object_hallu_q"] == 0
    assert TriheTask.aggregate([{**r, "n_judged": 0} for r in records]) == {}  # nothing rated: no rates


def load_questions_from(data: dict) -> list:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tri-he.json"
        path.write_text(json.dumps(data))
        return load_questions(path)


def test_data_format_errors_name_the_place(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps({"7": {"instance": [{"question": "q"}], "triplets": "(a, b, c)", "all_object": []}})
    )
    with pytest.raises(ValueError, match="image 7: triplets must be a list of strings"):
        load_questions(path)
    path.write_text(json.dumps({"7": {"instance": [], "all_object": []}}))
    with pytest.raises(ValueError, match="image 7: missing triplets"):
        load_questions(path)
    docs = load_questions(write_trihe(tmp_path / "ok", images=False)[0])
    assert [d.sample_id for d in docs][:4] == ["1001/0", "1001/1", "1001/2", "1002/0"]
    assert docs[0].objects == ("laptop", "pen", "man", "desk")  # duplicates dropped, order kept
    assert len(TriheTask(tmp_path / "ok" / "tri-he.json", limit=2).docs()) == 6  # whole images


# ------------------------------------------------------------------------------------ local NLI judge

NLI_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def tiny_cross_encoder(folder: Path, favour: str, id2label: dict[int, str]) -> Path:
    """A random BERT cross-encoder built from a config, with an offline word-level tokenizer, whose
    classifier bias makes ``favour`` the top class for every input."""
    texts = [t for e in DATA.values() for t in e["triplets"] + e["all_object"]]
    words = {w.strip("()").lower() for t in texts for w in t.replace(",", " ").split()}
    words = NLI_WORDS + sorted(words | {"the", "image", "shows", "nothing"})
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=256, num_labels=3, id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.bias.zero_()
        model.classifier.bias[next(k for k, v in id2label.items() if v == favour)] = 50.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}  # not the order of every checkpoint


def test_local_nli_judge_mechanics(tmp_path):
    docs = load_questions(write_trihe(tmp_path, images=False)[0])
    items = [ClaimItem(("man", "holding", "pen"), docs[0].references, docs[0].objects),
             ClaimItem(("woman", "riding", "horse"), docs[3].references, docs[3].objects),
             ClaimItem(("dog", "chasing", "cat"), (), ())]  # fmt: skip
    agree = NLIJudge(str(tiny_cross_encoder(tmp_path / "agree", "entailment", LABELS)), device="cpu")
    assert agree.entailment == 2
    assert [v.verdict for v in agree.judge_sync(items)] == ["yes"] * 3
    refuse = NLIJudge(str(tiny_cross_encoder(tmp_path / "refuse", "neutral", LABELS)), device="cpu")
    verdicts = refuse.judge_sync(items)  # nothing entailed, not even the objects: object errors
    assert [(v.verdict, v.error) for v in verdicts] == [("no", "object")] * 3
    assert refuse.judge_sync([]) == []
    plain = tiny_cross_encoder(tmp_path / "plain", "LABEL_0", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(JudgeSetupError, match="no entailment class"):
        NLIJudge(str(plain))
    with pytest.raises(JudgeSetupError, match="cannot load"):
        NLIJudge(str(tmp_path / "missing"))


def test_local_judge_through_score_is_labelled_a_deviation(app, tmp_path):
    data, _ = write_trihe(tmp_path, images=False)
    answers = write_answers(tmp_path / "answers.jsonl")
    model = tiny_cross_encoder(tmp_path / "nli", "entailment", LABELS)
    out = tmp_path / "local.json"
    with FakeOpenAI(scripted(), key=KEY) as server:  # extraction still goes to the chat model
        result = invoke(app, "score", "trihe", "--data", data, "--answers", answers, "--out", out,
                        "--no-progress", "--judge", f"local:{model}", "--judge-url", server.url,
                        "--judge-model", "m")  # fmt: skip
        assert all(request_kind(b)[0] == "extract" for b in server.requests)
    saved = json.loads(out.read_text())
    assert saved["task_info"]["judge"]["kind"] == "local-nli"
    assert "deviation" in saved["task_info"]["judge"]["label"] and "deviation" in result.output
    assert saved["metrics"]["hallu_q"] == 0.0 and saved["metrics"]["judge_error_rate"] == 0.0  # all entailed
    assert saved["task_info"]["counts"]["claims_judged"] == 9  # the extraction error stays one


# ------------------------------------------------------------------------------ eval trihe + report


def test_eval_trihe_end_to_end_resume_and_report(app, tmp_path):
    data, images = write_trihe(tmp_path)
    runs = {m: tmp_path / f"run-{m}" for m in ("vanilla", "vaf")}
    with FakeOpenAI(generic(), key=KEY) as server:
        for method, out in runs.items():
            invoke(app, "eval", "trihe", "--model", "builtin:tiny-llava", "--data", data,
                   "--image-root", images, "--method", method, "--max-new-tokens", 6, "--batch-size", 4,
                   "--no-progress", "--out", out, "--judge-url", server.url,
                   "--judge-model", "m")  # fmt: skip
            if method == "vanilla":
                judged = [b for b in server.requests if request_kind(b)[0] == "judge"]
        calls = server.calls
        results = json.loads((runs["vanilla"] / "results.json").read_text())
        records = read_jsonl(runs["vanilla"] / "samples.jsonl")
        # Every answer claims the same two things: one judge call per (claim, image), however many
        # questions of the image ask it at once.
        assert len(judged) == 2 * len({r["image_id"] for r in records if r["text"].strip()})
        assert results["task"] == "trihe" and results["n_scored"] == 9 and results["n_errors"] == 0
        said = [r for r in records if r["text"].strip()]
        assert said, "the tiny model answered nothing"
        assert all(r["hallu"] == 0.5 and r["relation_hallu"] == 0.5 for r in said)
        assert results["metrics"]["hallu_i"] == pytest.approx(0.5)
        assert results["metrics"]["claims_per_question"] == pytest.approx(2 * len(said) / 9)
        assert "Judge: LLM m" in (runs["vanilla"] / "results.md").read_text()
        assert (runs["vanilla"] / "judge_cache.jsonl").is_file()

        # Rerun: answers from the prediction cache, verdicts from the judge cache; nothing new.
        predictions = (runs["vanilla"] / "predictions.jsonl").read_text()
        invoke(app, "eval", "trihe", "--model", "builtin:tiny-llava", "--data", data, "--image-root", images,
               "--max-new-tokens", 6, "--no-progress", "--out", runs["vanilla"],
               "--judge-url", server.url, "--judge-model", "m")  # fmt: skip
        assert server.calls == calls
        assert (runs["vanilla"] / "predictions.jsonl").read_text() == predictions

    # With the judge gone, the same rerun still needs nothing from it: no probe, the same figures.
    invoke(app, "eval", "trihe", "--model", "builtin:tiny-llava", "--data", data, "--image-root", images,
           "--max-new-tokens", 6, "--no-progress", "--out", runs["vanilla"],
           "--judge-url", server.url, "--judge-model", "m")  # fmt: skip
    assert json.loads((runs["vanilla"] / "results.json").read_text())["metrics"] == results["metrics"]

    report = tmp_path / "report"
    result = invoke(app, "report", runs["vanilla"], runs["vaf"], "--out", report, "--resamples", 50)
    saved = json.loads((report / "report.json").read_text())
    assert saved["task"] == "trihe" and saved["scoring"].startswith("judge LLM m")
    assert "hallu_i" in saved["comparisons"]["vaf"]["metrics"] and "| hallu_i |" in result.output


def test_eval_trihe_refuses_a_missing_image_root(app, tmp_path):
    data, _ = write_trihe(tmp_path, images=False)
    result = invoke(app, "eval", "trihe", "--model", "builtin:tiny-llava", "--data", data,
                    "--image-root", tmp_path / "nowhere", "--judge-model", "m", code=2)  # fmt: skip
    assert "--image-root" in result.output
    result = invoke(app, "eval", "trihe", "--model", "builtin:tiny-llava", "--data", data,
                    "--image-root", tmp_path / "usage_figures", "--judge-model", "m", code=2)  # fmt: skip
    assert "holds none of the images" in result.output
