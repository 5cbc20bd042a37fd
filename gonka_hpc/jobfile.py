"""Job files in the OpenAI Batch format, and output lines as `vllm run-batch` writes them.

Input: JSONL, one request a line: `custom_id`, `method` ("POST"), `url` (`/v1/completions` or
`/v1/chat/completions`) and `body`. Each line is validated on its own with pydantic. A bad line
(bad JSON, a missing field, a wrong type, an unknown url, a duplicate `custom_id`, `max_tokens`
over the network limit, `min_tokens` over `max_tokens`) becomes a `LineError` that names the
file, line and field; every other line still runs. (`vllm run-batch` aborts the whole file on
one bad line; we don't.)

Output: one line per input line, in input order, with `id`, `custom_id`, `response`
{`status_code`, `request_id`, `body`} and `error`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic import ValidationError as PydanticError

from .errors import ValidationError

COMPLETIONS = "/v1/completions"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MIN_TEMPERATURE = 0.01
"""Below this (but above 0), logprob / T overflows and sampling is no longer checkable."""
CHAT = "/v1/chat/completions"
TOP_K_MAX = 2**31 - 1
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, as some Windows editors start files

# --- schemas --------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: Annotated[int, Field(ge=1)] = 16

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return v
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=TOP_K_MAX)] = -1
    """-1 or 0: off (vLLM's convention is -1). At most TOP_K_MAX: artifacts store it as int32
    (any value >= the vocabulary size keeps every token, as off does)."""
    seed: int | None = None
    """The client's seed. It is mixed with the finalized block hash, never used alone."""
    min_tokens: Annotated[int, Field(ge=0)] = 0
    """vLLM's extra parameter: no EOS or stop string ends the output before this many tokens
    (0 <= min_tokens <= max_tokens)."""
    stop: Annotated[str, Field(min_length=1)] | \
        Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
    n: Literal[1] = 1
    stream: Literal[False] = False
    user: str | None = None


class CompletionBody(_Body):
    prompt: Annotated[str, Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: Literal[False] = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):  # as the OpenAI API says
            raise ValueError("needs \"logprobs\": true")
        return v


class BatchLine(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    custom_id: Annotated[str, Field(min_length=1, max_length=256)]
    method: Literal["POST"]
    url: Literal["/v1/completions", "/v1/chat/completions"]
    body: dict[str, Any]


# --- parsed records -------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One valid line of a job file."""

    line: int  # 1-based line number in the job file
    custom_id: str
    url: str
    body: CompletionBody | ChatBody

    @property
    def max_tokens(self) -> int:
        if isinstance(self.body, ChatBody) and self.body.max_completion_tokens is not None:
            return self.body.max_completion_tokens
        return self.body.max_tokens

    @property
    def min_tokens(self) -> int:
        return self.body.min_tokens

    @property
    def stop(self) -> tuple[str, ...]:
        s = self.body.stop
        return () if s is None else (s,) if isinstance(s, str) else tuple(s)

    @property
    def top_logprobs(self) -> int | None:
        """How many logprobs the client asked to see in the output (None: none)."""
        if isinstance(self.body, CompletionBody):
            return self.body.logprobs
        return (self.body.top_logprobs or 0) if self.body.logprobs else None


@dataclass(frozen=True)
class LineError:
    """A line that cannot run; it is answered with an error line, in place."""

    line: int
    custom_id: str | None
    field: str | None
    message: str

    def describe(self, file: str) -> str:
        return str(ValidationError(self.message, file=file, line=self.line, field=self.field))


@dataclass(frozen=True)
class JobFile:
    path: Path
    sha256: str
    entries: list[Request | LineError]  # one per non-blank line, in file order

    @property
    def requests(self) -> list[Request]:
        return [e for e in self.entries if isinstance(e, Request)]

    @property
    def errors(self) -> list[LineError]:
        return [e for e in self.entries if isinstance(e, LineError)]


def _first_error(exc: PydanticError, prefix: str) -> tuple[str, str]:
    errors = exc.errors()
    # for a union (e.g. stop: str | list[str]) report the branch that matched the input's type
    err = next((e for e in errors if e["type"] not in ("string_type", "list_type")), errors[0])
    loc = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or _IDENT.match(str(p)))
    field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "value_error":  # our own validators' messages, without pydantic's
        msg = msg.removeprefix("Value error, ")  # prefix
    return field, msg


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def parse_line(text: str, line: int, *, model: str, max_tokens_limit: int,
               seen: set[str]) -> Request | LineError:
    """Validate one JSONL line. Never raises for bad input: returns a LineError instead."""
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        return LineError(line, None, None, f"not valid JSON: {exc.msg} at column {exc.colno}")
    except _DuplicateKey as exc:  # which value counts would be the parser's guess
        return LineError(line, None, None, f"key '{exc.args[0]}' appears twice in one object")
    custom_id = raw.get("custom_id") if isinstance(raw, dict) else None
    custom_id = custom_id if isinstance(custom_id, str) else None
    if not isinstance(raw, dict):
        return LineError(line, None, None, "a line must be a JSON object")
    if custom_id is not None:  # the first line that names a custom_id owns it, valid or not:
        if custom_id in seen:  # each custom_id gets one output line
            return LineError(line, custom_id, "custom_id",
                             f"duplicate custom_id '{custom_id}' (first use wins)")
        seen.add(custom_id)
    try:
        head = BatchLine.model_validate(raw)
    except PydanticError as exc:
        field, msg = _first_error(exc, "")
        return LineError(line, custom_id, field, msg)
    schema = CompletionBody if head.url == COMPLETIONS else ChatBody
    try:
        body = schema.model_validate(head.body)
    except PydanticError as exc:
        field, msg = _first_error(exc, "body")
        return LineError(line, custom_id, field, msg)
    if body.model != model:
        return LineError(line, custom_id, "body.model",
                         f"model '{body.model}' is not served by this network (it serves "
                         f"'{model}')")
    req = Request(line, head.custom_id, head.url, body)
    name = "max_completion_tokens" if isinstance(body, ChatBody) and \
        body.max_completion_tokens is not None else "max_tokens"
    if req.max_tokens > max_tokens_limit:
        return LineError(line, custom_id, f"body.{name}",
                         f"{req.max_tokens} is over the network limit of {max_tokens_limit}")
    if req.min_tokens > req.max_tokens:
        return LineError(line, custom_id, "body.min_tokens",
                         f"{req.min_tokens} is over {name} {req.max_tokens} (min_tokens "
                         f"must be <= {name})")
    return req


def read_job_file(path: Path, *, model: str, max_tokens_limit: int) -> JobFile:
    """Parse a whole job file. Raises only if the file itself cannot be read, or if no line
    of it can run (a whole epoch for nothing is never what the client meant)."""
    import hashlib

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValidationError("job file not found", file=str(path)) from None
    except IsADirectoryError:
        raise ValidationError("is a directory, not a job file", file=str(path)) from None
    except OSError as exc:  # permissions, a path through a file, a name too long, ...
        raise ValidationError(f"cannot read the job file: {exc.strerror or exc}",
                              file=str(path)) from None
    entries: list[Request | LineError] = []
    seen: set[str] = set()
    body = data[len(_BOM):] if data.startswith(_BOM) else data
    for n, raw_line in enumerate(body.split(b"\n"), start=1):
        if not raw_line.strip():
            continue
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            entries.append(LineError(n, None, None, f"line is not valid UTF-8 (byte "
                                                    f"{exc.start + 1} of the line)"))
            continue
        entries.append(parse_line(text, n, model=model, max_tokens_limit=max_tokens_limit,
                                  seen=seen))
    if not entries:
        raise ValidationError("job file has no requests", file=str(path))
    job = JobFile(path, hashlib.sha256(data).hexdigest(), entries)
    if not job.requests:
        first = job.errors[0]
        more = len(job.errors) - 1
        raise ValidationError(
            f"no valid requests: every line is bad; the first: {first.describe(path.name)}"
            + (f" (and {more} more)" if more else ""), file=str(path))
    return job


# --- output lines ---------------------------------------------------------------------------


def error_line(err: LineError, file: str, request_id: str) -> dict[str, Any]:
    """An output line for a line that could not run (vllm run-batch shape, response null)."""
    return {"id": f"batch_req_{request_id}", "custom_id": err.custom_id, "response": None,
            "error": {"code": "invalid_request", "message": err.describe(file),
                      "line": err.line, "field": err.field}}


def _logprobs_completion(tokens: list[str], lps: list[float],
                         top: list[dict[str, float]], offsets: list[int]) -> dict[str, Any]:
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top,
            "text_offset": offsets}


def response_line(custom_id: str, url: str, request_id: str, *, top_logprobs: int | None,
                  text: str, finish_reason: str,
                  prompt_tokens: int, completion_tokens: int, model: str,
                  logprob_tokens: list[str] | None = None,
                  token_logprobs: list[float] | None = None,
                  top_tokens: list[list[tuple[str, float]]] | None = None,
                  executor: str | None = None) -> dict[str, Any]:
    """An output line for a request that ran: an OpenAI completion / chat completion body."""
    created = int(time.time())
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    want = top_logprobs
    lp: Any = None
    if want is not None and logprob_tokens is not None and token_logprobs is not None \
            and top_tokens is not None:
        if url == COMPLETIONS:
            offsets, pos = [], 0
            for t in logprob_tokens:
                offsets.append(pos)
                pos += len(t)
            lp = _logprobs_completion(logprob_tokens, token_logprobs,
                                      [dict(row[:want]) for row in top_tokens], offsets)
        else:
            lp = {"content": [
                {"token": t, "logprob": v, "bytes": list(t.encode()),
                 "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())}
                                  for a, b in row[:want]]}
                for t, v, row in zip(logprob_tokens, token_logprobs, top_tokens)]}
    if url == COMPLETIONS:
        body: dict[str, Any] = {
            "id": f"cmpl-{request_id}", "object": "text_completion", "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": lp,
                         "finish_reason": finish_reason}],
            "usage": usage}
    else:
        body = {
            "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": created,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": lp, "finish_reason": finish_reason}],
            "usage": usage}
    if executor is not None:
        body["system_fingerprint"] = f"gonka-hpc:{executor}"
    return {"id": f"batch_req_{request_id}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body},
            "error": None}


def failed_line(custom_id: str, request_id: str, message: str) -> dict[str, Any]:
    """An output line for a valid request that failed while running."""
    return {"id": f"batch_req_{request_id}", "custom_id": custom_id,
            "response": {"status_code": 500, "request_id": request_id,
                         "body": {"error": {"message": message, "type": "server_error"}}},
            "error": None}
