"""Job files: every kind of bad line becomes an error naming line and field; the rest runs.

Also pins the output-line shapes (`vllm run-batch` / OpenAI Batch).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gonka_hpc.errors import ValidationError
from gonka_hpc.jobfile import (
    ChatBody,
    LineError,
    Request,
    error_line,
    read_job_file,
    response_line,
)

MODEL = "gonka-tiny"


def _line(custom_id: str = "a", url: str = "/v1/completions", **body: object) -> str:
    b = {"model": MODEL, "prompt": "one two", "max_tokens": 8, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": b})


def _parse(tmp_path: Path, lines: list[str]):  # type: ignore[no-untyped-def]
    path = tmp_path / "job.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return read_job_file(path, model=MODEL, max_tokens_limit=64)


def test_valid_completion_and_chat(tmp_path: Path) -> None:
    chat = json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                "max_completion_tokens": 5, "temperature": 1, "logprobs": True,
                                "top_logprobs": 2, "stop": ";"}})
    job = _parse(tmp_path, [_line(seed=3, top_k=5, temperature=0.5), "", chat])
    assert [type(e) for e in job.entries] == [Request, Request]
    comp, ch = job.requests
    assert (comp.line, comp.body.seed, comp.max_tokens, comp.top_logprobs) == (1, 3, 8, None)
    assert isinstance(ch.body, ChatBody)
    assert (ch.line, ch.max_tokens, ch.top_logprobs, ch.stop) == (3, 5, 2, (";",))


@pytest.mark.parametrize("text, field, message", [
    ("{not json", None, "not valid JSON"),
    ("[1, 2]", None, "JSON object"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions"}), "body",
     "Field required"),
    (_line(max_tokens="8"), "body.max_tokens", "valid integer"),
    (_line(url="/v1/embeddings"), "url", "/v1/completions"),
    (_line(max_tokens=65), "body.max_tokens", "over the network limit of 64"),
    (_line(temperature=-1.0), "body.temperature", "greater than or equal"),
    (_line(top_p=0.0), "body.top_p", "greater than 0"),
    (_line(model="gpt-4o"), "body.model", "not served by this network"),
    (_line(frobnicate=1), "body.frobnicate", "unknown field"),
    (_line(n=2), "body.n", "1"),
    (_line(temperature=1e-310), "body.temperature", "at least 0.01"),
    (_line(stop=[""]), "body.stop.0", "at least 1 character"),
    (_line(min_tokens=9), "body.min_tokens", "9 is over max_tokens 8"),
    (_line(min_tokens=-1), "body.min_tokens", "greater than or equal to 0"),
    (json.dumps({"custom_id": "m", "method": "GET", "url": "/v1/completions", "body": {}}),
     "method", "POST"),
    # artifacts store top_k as int32: a bigger one must be this line's error, not a crash
    # of the ML node that takes the whole epoch down
    (_line(top_k=2**31), "body.top_k", "less than or equal to 2147483647"),
    ('{"custom_id": "d", "custom_id": "e", "method": "POST"}', None, "'custom_id' appears twice"),
    (json.dumps({"custom_id": "t", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "top_logprobs": 2}}), "body.top_logprobs", 'needs "logprobs": true'),
    ('{"custom_id": "nan", "method": "POST", "url": "/v1/completions", "body": {"model": '
     f'"{MODEL}", "prompt": "x", "temperature": NaN}}}}', "body.temperature", "finite number"),
])
def test_bad_line_is_located(tmp_path: Path, text: str, field: str | None,
                             message: str) -> None:
    job = _parse(tmp_path, [_line("ok-1"), text, _line("ok-2")])
    assert [type(e) for e in job.entries] == [Request, LineError, Request]
    err = job.errors[0]
    assert (err.line, err.field) == (2, field)
    assert message in err.message
    described = err.describe("job.jsonl")
    assert described.startswith("job.jsonl:2: ")
    if field:
        assert f"field '{field}'" in described


def test_duplicate_custom_id_first_wins(tmp_path: Path) -> None:
    job = _parse(tmp_path, [_line("x"), _line("y"), _line("x")])
    assert [e.line for e in job.requests] == [1, 2]
    assert job.errors[0].line == 3 and job.errors[0].field == "custom_id"


def test_first_use_of_a_custom_id_wins_even_when_that_line_is_bad(tmp_path: Path) -> None:
    """A later valid line cannot reuse the id of an earlier bad one: the output would hold
    an error and a result under one custom_id, and a client looking results up by id would
    find whichever came first."""
    job = _parse(tmp_path, [_line("c", model="gpt-4o"), _line("c"), _line("d")])
    assert [e.line for e in job.requests] == [3]
    assert [(e.line, e.field) for e in job.errors] == [(1, "body.model"), (2, "custom_id")]
    assert "duplicate custom_id 'c'" in job.errors[1].message


def test_own_validator_messages_have_no_pydantic_prefix(tmp_path: Path) -> None:
    job = _parse(tmp_path, [_line("a"), _line("b", temperature=0.001)])
    assert job.errors[0].message.startswith("must be 0 (greedy)")


def test_a_utf8_byte_order_mark_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "job.jsonl"
    data = b"\xef\xbb\xbf" + (_line("a") + "\n" + _line("b") + "\n").encode()
    path.write_bytes(data)
    job = read_job_file(path, model=MODEL, max_tokens_limit=64)
    assert [e.line for e in job.requests] == [1, 2] and not job.errors
    import hashlib
    assert job.sha256 == hashlib.sha256(data).hexdigest()  # the file as given


def test_a_file_without_one_valid_line_is_refused(tmp_path: Path) -> None:
    """A whole epoch (escrow, validators, settlement) for nothing is never what was meant."""
    path = tmp_path / "job.jsonl"
    path.write_text("{}\n" + _line("a", model="gpt-4o") + "\n")
    with pytest.raises(ValidationError) as err:
        read_job_file(path, model=MODEL, max_tokens_limit=64)
    msg = str(err.value)
    assert "no valid requests" in msg and "job.jsonl:1:" in msg and "1 more" in msg


def test_invalid_utf8_line_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "job.jsonl"
    path.write_bytes(_line("a").encode() + b"\n\xff\xfe\n" + _line("b").encode() + b"\n")
    job = read_job_file(path, model=MODEL, max_tokens_limit=64)
    assert [e.line for e in job.requests] == [1, 3]
    assert "not valid UTF-8 (byte 1 of the line)" in job.errors[0].message


def test_unreadable_files_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not found"):
        read_job_file(tmp_path / "nope.jsonl", model=MODEL, max_tokens_limit=64)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValidationError, match="no requests"):
        read_job_file(tmp_path / "empty.jsonl", model=MODEL, max_tokens_limit=64)
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file" / "job.jsonl", tmp_path / ("a" * 300 + ".jsonl")):
        with pytest.raises(ValidationError, match="cannot read the job file"):
            read_job_file(bad, model=MODEL, max_tokens_limit=64)


def test_output_line_shapes(tmp_path: Path) -> None:
    job = _parse(tmp_path, [_line("a", logprobs=2), "{bad"])
    req = job.requests[0]
    out = response_line(req.custom_id, req.url, "job-1:1", top_logprobs=req.top_logprobs,
                        text=" three", finish_reason="length", prompt_tokens=2,
                        completion_tokens=1, model=MODEL, logprob_tokens=[" three"],
                        token_logprobs=[-0.1], top_tokens=[[(" three", -0.1), (" four", -2.5),
                                                            (" x", -4.0)]])
    assert set(out) == {"id", "custom_id", "response", "error"}
    assert out["error"] is None and out["response"]["status_code"] == 200
    body = out["response"]["body"]
    assert body["object"] == "text_completion"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    assert body["choices"][0]["logprobs"]["top_logprobs"] == [{" three": -0.1, " four": -2.5}]
    err = error_line(job.errors[0], "job.jsonl", "job-1:2")
    assert err["response"] is None and err["error"]["line"] == 2
    assert err["error"]["message"].startswith("job.jsonl:2:")
