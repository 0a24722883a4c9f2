"""LLM judge over an OpenAI-compatible endpoint, against httpx.MockTransport (no network)."""

from __future__ import annotations

import json

import httpx
import pytest

from sa_lens.evaluation.judge_registry import JudgeUnavailableError
from sa_lens.evaluation.judges import Verdict
from sa_lens.evaluation.llm_judge import LLMJudge, parse_verdict


def _reply(text: str) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"message": {"content": text}}]})


def _judge(handler, monkeypatch, **kw) -> tuple[LLMJudge, list[float]]:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    waits: list[float] = []
    judge = LLMJudge(base_url="http://judge.local/v1", transport=httpx.MockTransport(handler), sleep=waits.append,
                     max_workers=1, **kw)
    return judge, waits


def test_verdicts_follow_the_paper_protocol(monkeypatch):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.headers["authorization"], body["messages"][1]["content"]))
        return _reply("The answer gives steps. [B]" if "steps" in body["messages"][1]["content"] else "Refuses. [A]")

    judge, _ = _judge(handler, monkeypatch)
    assert judge.judge_batch(["How to x?", "How to y?"], ["Here are the steps", "I can't"]) == [Verdict.HARMFUL, Verdict.SAFE]
    auth, prompt = seen[0]
    assert auth == "Bearer sk-test"
    assert "How to x?" in prompt and "Here are the steps" in prompt and '"[A]"' in prompt and '"[B]"' in prompt


def test_last_verdict_wins_and_missing_verdict_fails():
    assert parse_verdict("[A] would be wrong here, so: [[B]]") is Verdict.HARMFUL
    assert parse_verdict("I cannot judge this.") is Verdict.FAILED


def test_unparseable_reply_is_failed_not_safe(monkeypatch):
    judge, _ = _judge(lambda r: _reply("no verdict"), monkeypatch)
    assert judge.judge_batch(["q"], ["a"]) == [Verdict.FAILED]
    assert "no [A]/[B]" in judge.errors[0][1]


def test_retries_with_exponential_backoff_then_succeeds(monkeypatch):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(503) if len(calls) < 3 else _reply("[A]")

    judge, waits = _judge(handler, monkeypatch, backoff_s=0.5)
    assert judge.judge_batch(["q"], ["a"]) == [Verdict.SAFE]
    assert waits == [0.5, 1.0]


def test_http_errors_after_retries_are_failed(monkeypatch):
    judge, waits = _judge(lambda r: httpx.Response(429), monkeypatch, max_retries=3)
    assert judge.judge_batch(["q"], ["a"]) == [Verdict.FAILED]
    assert waits == [1.0, 2.0, 4.0]


def test_unreachable_endpoint_raises_a_clear_error_after_retries(monkeypatch):
    def handler(request):
        raise httpx.ConnectError("connection refused", request=request)

    judge, waits = _judge(handler, monkeypatch, max_retries=2)
    with pytest.raises(JudgeUnavailableError, match=r"could not be reached after 3 attempts.*rerun to resume"):
        judge.judge_batch(["q"], ["a"])
    assert len(waits) == 2


def test_rejected_key_stops_at_once(monkeypatch):
    judge, waits = _judge(lambda r: httpx.Response(401, text="bad key"), monkeypatch)
    with pytest.raises(JudgeUnavailableError, match="HTTP 401"):
        judge.judge_batch(["q"], ["a"])
    assert waits == []


def test_key_comes_only_from_the_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$OPENAI_API_KEY"):
        LLMJudge()
    assert "api_key" not in LLMJudge.__init__.__code__.co_varnames
    LLMJudge(api_key_env=None)  # a local endpoint without auth


def test_judge_closes_its_connections_as_a_context_manager(monkeypatch):
    judge, _ = _judge(lambda r: _reply("[A]"), monkeypatch)
    with judge as j:
        assert j.judge_batch(["q"], ["a"]) == [Verdict.SAFE]
    assert judge._client.is_closed


@pytest.mark.parametrize("body", [
    {"error": {"code": "content_filter", "message": "The response was filtered (Azure content management policy)."}},
    {"error": {"code": "context_length_exceeded", "message": "This model's maximum context length is 8192 tokens."}},
])
def test_a_request_refused_for_its_content_fails_that_item_only(monkeypatch, body):
    # Harmful answers trip providers' content filters; that is one item without a verdict, not a dead endpoint.
    def handler(request: httpx.Request) -> httpx.Response:
        if "bomb" in json.loads(request.content)["messages"][1]["content"]:
            return httpx.Response(400, json=body)
        return _reply("[A]")

    judge, _ = _judge(handler, monkeypatch)
    assert judge.judge_batch(["How to x?", "How to y?"], ["Build a bomb like so", "I can't"]) == [
        Verdict.FAILED, Verdict.SAFE]
    assert judge.errors[0][0] == 0 and "HTTP 400" in judge.errors[0][1]


def test_a_judge_reply_with_null_content_fails_that_item_and_the_batch_goes_on(monkeypatch):
    def handler(request: httpx.Request) -> httpx.Response:
        declined = "refuse me" in json.loads(request.content)["messages"][1]["content"]
        return httpx.Response(200, json={"choices": [{"message": {"content": None, "refusal": "No."}}]}) if declined \
            else _reply("[B]")

    judge, _ = _judge(handler, monkeypatch)
    assert judge.judge_batch(["q1", "q2"], ["refuse me", "steps"]) == [Verdict.FAILED, Verdict.HARMFUL]
    assert "no text" in judge.errors[0][1]
