"""LLM judge over an OpenAI-compatible endpoint through the ``openai`` SDK, against a mock transport (no network).

The SDK sends with httpx (openai 1.x) or httpx2 (openai ≥ 3), whichever its client class derives from; the
tests take MockTransport from that library, so they run on either.
"""

from __future__ import annotations

import importlib
import json
import time

import openai
import pytest

from sa_lens.evaluation.judge_registry import JudgeUnavailableError
from sa_lens.evaluation.judges import Verdict
from sa_lens.evaluation.llm_judge import LLMJudge, parse_verdict

http = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])
FAST = {"retry-after-ms": "1"}  # the SDK honours a server's delay: keeps retried tests fast


def _reply(text, **message) -> object:
    return http.Response(200, json={"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": text, **message}}]})


def _judge(handler, monkeypatch, **kw) -> LLMJudge:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    client = openai.DefaultHttpxClient(transport=http.MockTransport(handler))
    return LLMJudge(base_url="http://judge.local/v1", http_client=client, max_workers=1, **kw)


def _prompt(request) -> str:
    return json.loads(request.content)["messages"][1]["content"]


def test_verdicts_follow_the_paper_protocol(monkeypatch):
    seen = []

    def handler(request):
        seen.append((str(request.url), request.headers["authorization"], json.loads(request.content)))
        return _reply("The answer gives steps. [B]" if "steps" in _prompt(request) else "Refuses. [A]")

    judge = _judge(handler, monkeypatch)
    assert judge.judge_batch(["How to x?", "How to y?"], ["Here are the steps", "I can't"]) == [
        Verdict.HARMFUL, Verdict.SAFE]
    url, auth, body = seen[0]
    assert url == "http://judge.local/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["temperature"] == 0 and body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    prompt = body["messages"][1]["content"]
    assert "How to x?" in prompt and "Here are the steps" in prompt and '"[A]"' in prompt and '"[B]"' in prompt


def test_last_verdict_wins_and_missing_verdict_fails():
    assert parse_verdict("[A] would be wrong here, so: [[B]]") is Verdict.HARMFUL
    assert parse_verdict("I cannot judge this.") is Verdict.FAILED
    assert parse_verdict(None) is Verdict.FAILED


def test_a_reasoning_judges_thinking_is_never_read_for_its_verdict():
    assert parse_verdict("<think>Could be [A] or [B]</think>") is Verdict.FAILED
    assert parse_verdict("<think>It says [B]... no.</think>\nVerdict: [A]") is Verdict.SAFE
    assert parse_verdict("<think>Weighing [A] against [B], the reply gives steps so") is Verdict.FAILED  # cut off


def test_rate_limit_is_retried_after_the_servers_retry_after(monkeypatch):
    calls = []

    def handler(request):
        calls.append(time.monotonic())
        if len(calls) == 1:
            return http.Response(429, headers={"retry-after": "0.05"}, json={"error": {"message": "slow down"}})
        return _reply("[A]")

    judge = _judge(handler, monkeypatch)
    assert judge.judge_batch(["q"], ["a"]) == [Verdict.SAFE] and judge.errors == []
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.05  # waited what the server asked, not 0.5 s of backoff


@pytest.mark.parametrize(("response", "why"), [
    (lambda: _reply(None, refusal="I can't help with that."), "no text"),
    (lambda: _reply("   "), "no text"),
    (lambda: _reply("This answer seems fine to me."), "no [A]/[B]"),
    (lambda: http.Response(200, text="<html>gateway</html>"), "no choices in the response: <html>"),
    (lambda: http.Response(200, json={"choices": []}), "no choices"),
    (lambda: http.Response(200, headers={"content-type": "application/json"}, content=b"{truncated"),
     "unexpected response"),
    (lambda: http.Response(200, json={"unexpected": True}), "no choices"),
])
def test_unusable_judge_replies_fail_that_item_only(monkeypatch, response, why):
    def handler(request):
        return _reply("[B]") if "steps" in _prompt(request) else response()

    judge = _judge(handler, monkeypatch)
    assert judge.judge_batch(["q1", "q2"], ["odd", "steps"]) == [Verdict.FAILED, Verdict.HARMFUL]
    assert judge.errors[0][0] == 0 and why in judge.errors[0][1]


def test_server_errors_that_outlive_the_retries_are_failed(monkeypatch):
    calls = []

    def handler(request):
        calls.append(1)
        return http.Response(500, headers=FAST, json={"error": {"message": "boom"}})

    judge = _judge(handler, monkeypatch, max_retries=2)
    assert judge.judge_batch(["q"], ["a"]) == [Verdict.FAILED]
    assert len(calls) == 3 and "HTTP 500 after 3 attempts" in judge.errors[0][1]


def test_unreachable_endpoint_raises_a_clear_error_after_retries(monkeypatch):
    calls = []

    def handler(request):
        calls.append(1)
        raise http.ConnectError("connection refused", request=request)

    judge = _judge(handler, monkeypatch, max_retries=1)
    with pytest.raises(JudgeUnavailableError, match=r"could not be reached after 2 attempts.*rerun to resume"):
        judge.judge_batch(["q"], ["a"])
    assert len(calls) == 2


def test_rejected_key_stops_at_once(monkeypatch):
    calls = []

    def handler(request):
        calls.append(1)
        return http.Response(401, json={"error": {"message": "bad key"}})

    judge = _judge(handler, monkeypatch)
    with pytest.raises(JudgeUnavailableError, match="HTTP 401"):
        judge.judge_batch(["q"], ["a"])
    assert len(calls) == 1


def test_key_comes_only_from_the_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$OPENAI_API_KEY"):
        LLMJudge()
    assert "api_key" not in LLMJudge.__init__.__code__.co_varnames
    LLMJudge(api_key_env=None)  # a local endpoint without auth


def test_judge_closes_its_connections_as_a_context_manager(monkeypatch):
    judge = _judge(lambda r: _reply("[A]"), monkeypatch)
    with judge as j:
        assert j.judge_batch(["q"], ["a"]) == [Verdict.SAFE]
    assert judge._client._client.is_closed


@pytest.mark.parametrize("body", [
    {"error": {"code": "content_filter", "message": "The response was filtered (Azure content management policy)."}},
    {"error": {"code": "context_length_exceeded", "message": "This model's maximum context length is 8192 tokens."}},
])
def test_a_request_refused_for_its_content_fails_that_item_only(monkeypatch, body):
    # Harmful answers trip providers' content filters; that is one item without a verdict, not a dead endpoint.
    def handler(request):
        return http.Response(400, json=body) if "bomb" in _prompt(request) else _reply("[A]")

    judge = _judge(handler, monkeypatch)
    assert judge.judge_batch(["How to x?", "How to y?"], ["Build a bomb like so", "I can't"]) == [
        Verdict.FAILED, Verdict.SAFE]
    assert judge.errors[0][0] == 0 and "HTTP 400" in judge.errors[0][1]


def test_a_reply_cut_by_the_content_filter_is_failed(monkeypatch):
    def handler(request):
        body = json.loads(_reply("[A").content)
        body["choices"][0]["finish_reason"] = "content_filter"
        return http.Response(200, json=body)

    judge = _judge(handler, monkeypatch)
    assert judge.judge_batch(["q"], ["a"]) == [Verdict.FAILED] and "content filter" in judge.errors[0][1]


@pytest.mark.parametrize("blank", ["", " \n", "</s>", "<|eot_id|>", "<end_of_turn>"])
def test_blank_replies_are_degenerate_and_never_sent(monkeypatch, blank):
    sent = []

    def handler(request):
        sent.append(_prompt(request))
        return _reply("[B]")

    judge = _judge(handler, monkeypatch)
    assert judge.judge_batch(["q1", "q2"], [blank, "steps"]) == [Verdict.DEGENERATE, Verdict.HARMFUL]
    assert len(sent) == 1 and "steps" in sent[0] and judge.errors == []
