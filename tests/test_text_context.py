"""Text in a conversation (issue 44): the ``context`` field of the text routes and the stream, and its use.

The contract tests run the ingress app in-process with fake encoders (fast, no Ray); the model tests run the
committed text weights through :class:`models.inference.TextPipeline`.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from models.inference import TextPipeline
from models.labels import EMOTIONS
from models.text.preprocessing import TextPreprocessor, Turn
from serve.config import MAX_CONTEXT_CHARS, MAX_CONTEXT_TURNS, AppConfig
from serve.stream import INVALID, TOO_BIG, StreamClosed, StreamWindow
from tests.test_serve_api_unit import answer, make

TURNS = ["I have some news.", {"speaker": "Ross", "text": "I got the job!"}]
PAYLOAD_TURNS = [{"speaker": None, "text": "I have some news."}, {"speaker": "Ross", "text": "I got the job!"}]


def _text_answer(payload: Any) -> dict[str, Any]:
    extra = {"context_turns": len(payload["context"]), "context_cut": 0} if isinstance(payload, dict) else {}
    return answer("text", "surprise", truncated=False, characters=3, **extra)


# ---- the JSON route -------------------------------------------------------------------------------------------


def test_json_context_both_shapes_reach_the_encoder() -> None:
    h = make(text=_text_answer)
    r = h.request("POST", "/api/predict", json={"text": "Oh.", "context": TURNS})
    assert r.status_code == 200, r.text
    assert h.handles["text"].payloads == [{"text": "Oh.", "context": PAYLOAD_TURNS}]
    text = r.json()["modalities"]["text"]
    assert text["context_turns"] == 2 and text["context_cut"] == 0


@pytest.mark.parametrize("context", [None, []])
def test_no_context_sends_the_text_as_before(context: list[Any] | None) -> None:
    h = make(text=_text_answer)
    r = h.request("POST", "/api/predict", json={"text": "Oh.", "context": context})
    assert r.status_code == 200, r.text
    assert h.handles["text"].payloads == ["Oh."]
    assert "context_turns" not in r.json()["modalities"]["text"]


@pytest.mark.parametrize(
    "context,where",
    [
        ("I got the job!", ["body", "context"]),  # not a list
        ([3], ["body", "context", 0]),  # a turn that is neither a string nor an object
        ([{"speaker": "Ross"}], ["body", "context", 0]),  # no text
        ([{"text": "hi", "mood": "happy"}], ["body", "context", 0]),  # an unknown key
        ([{"speaker": 7, "text": "hi"}], ["body", "context", 0]),
        ([""], ["body", "context", 0]),
        (["x" * (MAX_CONTEXT_CHARS + 1)], ["body", "context", 0]),
        (["turn"] * (MAX_CONTEXT_TURNS + 1), ["body", "context"]),  # too many turns
    ],
)
def test_json_context_that_does_not_fit_the_schema_is_422(context: Any, where: list[Any]) -> None:
    h = make(text=_text_answer)
    r = h.request("POST", "/api/predict", json={"text": "Oh.", "context": context})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert isinstance(errors, list) and all(e["loc"][: len(where)] == where for e in errors), errors
    assert h.handles["text"].payloads == []


def test_deployment_limits_below_the_schemas_are_422_with_a_reason() -> None:
    h = make({"limits": {"max_context_turns": 2, "max_context_chars": 10}}, text=_text_answer)
    r = h.request("POST", "/api/predict", json={"text": "Oh.", "context": ["a", "b", "c"]})
    assert r.status_code == 422 and r.json()["detail"] == "context has 3 turns; at most 2 are allowed"
    r = h.request("POST", "/api/predict", json={"text": "Oh.", "context": [{"text": "x" * 11}]})
    assert r.status_code == 422 and r.json()["detail"] == "context turn 0 is longer than 10 characters"
    assert h.handles["text"].payloads == []


def test_openapi_describes_the_context_field() -> None:
    spec = make().request("GET", "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    field = next(s for s in schemas["TextRequest"]["properties"]["context"]["anyOf"] if s.get("type") == "array")
    assert field["maxItems"] == MAX_CONTEXT_TURNS
    shapes = field["items"]["anyOf"]
    assert {"type": "string", "minLength": 1, "maxLength": MAX_CONTEXT_CHARS} in shapes
    assert {"$ref": "#/components/schemas/ContextTurn"} in shapes
    assert schemas["ContextTurn"]["required"] == ["text"]
    assert schemas["ContextTurn"]["additionalProperties"] is False
    form = schemas["Body_predict_predict_post"]["properties"]["context"]
    assert form["type"] == "string" and form["contentMediaType"] == "application/json"
    assert form["contentSchema"]["maxItems"] == MAX_CONTEXT_TURNS


# ---- the form route -------------------------------------------------------------------------------------------


def test_form_context_is_the_same_json() -> None:
    h = make(text=_text_answer)
    r = h.request("POST", "/predict", data={"text": "Oh.", "context": json.dumps(TURNS)})
    assert r.status_code == 200, r.text
    assert h.handles["text"].payloads == [{"text": "Oh.", "context": PAYLOAD_TURNS}]
    assert r.json()["modalities"]["text"]["context_turns"] == 2


@pytest.mark.parametrize(
    "raw",
    ["not json", json.dumps({"text": "hi"}), json.dumps([1]), json.dumps(["turn"] * (MAX_CONTEXT_TURNS + 1))],
)
def test_form_context_that_does_not_fit_is_422(raw: str) -> None:
    h = make(text=_text_answer)
    r = h.request("POST", "/predict", data={"text": "Oh.", "context": raw})
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert isinstance(errors, list) and all(e["loc"][:2] == ["body", "context"] for e in errors), errors
    assert h.handles["text"].payloads == []


def test_form_context_over_the_deployment_limit_is_422() -> None:
    h = make({"limits": {"max_context_turns": 1}}, text=_text_answer)
    r = h.request("POST", "/predict", data={"text": "Oh.", "context": json.dumps(TURNS)})
    assert r.status_code == 422 and "at most 1" in r.json()["detail"]


# ---- the live stream's text message ---------------------------------------------------------------------------


def _window() -> StreamWindow:
    limits = AppConfig().limits
    return StreamWindow(AppConfig().stream, limits.max_text_chars, 2, 20)


def _text_message(**body: Any) -> dict[str, Any]:
    return {"type": "websocket.receive", "text": json.dumps({"type": "text", **body})}


def test_stream_text_message_carries_the_context() -> None:
    w = _window()
    w.apply(_text_message(text="Oh.", context=TURNS), now=0.0)
    snapshot = w.snapshot(0.0)
    assert snapshot is not None and snapshot.payloads["text"] == {"text": "Oh.", "context": PAYLOAD_TURNS}
    w.apply(_text_message(text="Oh."), now=0.1)  # a text without context clears it
    snapshot = w.snapshot(0.1)
    assert snapshot is not None and snapshot.payloads["text"] == "Oh."


@pytest.mark.parametrize(
    "context,code",
    [(["a", "b", "c"], TOO_BIG), (["x" * 21], TOO_BIG), ("a string", INVALID), ([{"who": "me"}], INVALID)],
)
def test_stream_context_over_the_limits_or_malformed_closes(context: Any, code: int) -> None:
    w = _window()
    with pytest.raises(StreamClosed) as info:
        w.apply(_text_message(text="Oh.", context=context), now=0.0)
    assert info.value.code == code


# ---- the tokenizer pair ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preprocessor() -> TextPreprocessor:
    return TextPreprocessor(max_length=24)


def test_pair_input_keeps_the_newest_turns_and_says_how_many_were_cut(preprocessor: TextPreprocessor) -> None:
    first = Turn("one two three four five six seven and many more words", "Ann")
    turns = [first, Turn("eight nine ten", "Bob"), Turn("eleven", None)]
    tok = preprocessor(["Oh."], [turns])
    decoded = preprocessor.tokenizer.decode(tok.input_ids[0])
    assert decoded == "[CLS] oh. [SEP] bob : eight nine ten | eleven [SEP]"
    assert (tok.context_turns, tok.context_cut, tok.truncated) == ([2], [1], [False])


def test_without_context_the_input_is_unchanged(preprocessor: TextPreprocessor) -> None:
    plain = preprocessor(["Oh.", "a longer utterance"])
    empty = preprocessor(["Oh.", "a longer utterance"], [(), ()])
    assert plain.input_ids.tolist() == empty.input_ids.tolist()
    mixed = preprocessor(["Oh.", "a longer utterance"], [(), (Turn("hi"),)])
    width = int(plain.attention_mask[0].sum())
    assert mixed.input_ids[0, :width].tolist() == plain.input_ids[0, :width].tolist()
    assert (mixed.context_turns, mixed.context_cut) == ([0, 1], [0, 0])


def test_the_utterance_is_never_cut_for_the_context(preprocessor: TextPreprocessor) -> None:
    long = " ".join(["word"] * 40)
    tok = preprocessor([long], [(Turn("hello there"),)])
    assert tok.input_ids.shape[1] == 24 and tok.truncated == [True]
    assert (tok.context_turns, tok.context_cut) == ([0], [1])


# ---- the committed model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text() -> TextPipeline:
    return TextPipeline()


def _probs(text: TextPipeline, utterance: str, context: list[Any]) -> dict[str, float]:
    result = text.encode([text.prepare({"text": utterance, "context": context})])[0]
    return dict(zip(EMOTIONS, result.probabilities.round(3).tolist(), strict=True))


def test_pipeline_reports_the_turns_it_read(text: TextPipeline) -> None:
    many = [{"speaker": "Ann", "text": "this is a fairly long turn of the conversation " * 2}] * 12
    result = text.encode([text.prepare({"text": "Really?", "context": many}), text.prepare("Really?")])
    read, alone = result
    if text.reads_context:
        assert read.info["context_turns"] > 0 and read.info["context_turns"] + read.info["context_cut"] == 12
    else:
        assert read.info["context_turns"] == 0 and read.info["context_cut"] == 12
    assert "context_turns" not in alone.info


def test_context_changes_the_answer_for_an_utterance_that_needs_it(text: TextPipeline) -> None:
    if not text.reads_context:
        pytest.skip(f"the committed text model {text.version} reads no context")
    news = [
        {"speaker": "Rachel", "text": "Ross, I have some terrible news."},
        {"speaker": "Rachel", "text": "Your grandmother passed away last night. I'm so sorry."},
    ]
    alone, told = _probs(text, "Oh.", []), _probs(text, "Oh.", news)
    assert max(alone, key=alone.__getitem__) == "neutral", alone  # "Oh." alone says little
    # the news moves the answer towards sad: neutral loses a good part of its weight, sad gains it
    assert told["sad"] > alone["sad"] + 0.15 and told["neutral"] < alone["neutral"] - 0.2, (alone, told)
    good = [{"speaker": "Monica", "text": "I got the job! They called this morning and I start on Monday!"}]
    assert _probs(text, "Oh.", good)["sad"] < alone["sad"], "good news does not make it sadder"


def test_a_context_expert_answers_only_texts_sent_with_turns(tmp_path: Any) -> None:
    import shutil

    import numpy as np
    import torch

    from models.checkpoint import DEFAULT_WEIGHTS_DIR
    from models.common import forward_in_precision
    from models.text.model import CONTEXT_EXPERT, with_context

    base = DEFAULT_WEIGHTS_DIR / "text"
    folder = tmp_path / "text"
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns(CONTEXT_EXPERT))
    plain = TextPipeline(folder)
    shutil.copytree(folder, folder / CONTEXT_EXPERT)  # the utterance model again, as the expert: easy to follow
    both = TextPipeline(folder)
    assert both.reads_context and both.version == f"{plain.version}+{plain.version}"
    turns = [{"speaker": "Rachel", "text": "Your grandmother passed away last night."}]
    items = [both.prepare("Oh."), both.prepare({"text": "Oh.", "context": turns})]
    alone, told = both.encode(items)
    np.testing.assert_allclose(alone.probabilities, plain.encode([plain.prepare("Oh.")])[0].probabilities, atol=1e-6)
    np.testing.assert_allclose(alone.embedding, told.embedding, atol=1e-6)  # the fusion sees the utterance model's
    pair = TextPreprocessor(plain.model.config.backbone)(["Oh."], [tuple(Turn(t["text"], t["speaker"]) for t in turns)])
    with torch.inference_mode():
        inputs = (pair.input_ids, pair.attention_mask)
        _, logits = forward_in_precision(both.context_expert, inputs, both.precision, both.device)
        expected = with_context(
            torch.from_numpy(alone.probabilities)[None], both.context_expert.head.probabilities(logits)
        )
    np.testing.assert_allclose(told.probabilities, expected[0].numpy(), atol=2e-3)
    assert told.info["context_turns"] == 1 and told.info["context_cut"] == 0
    assert not np.allclose(told.probabilities, alone.probabilities, atol=1e-3)
