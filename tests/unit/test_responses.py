"""deny_response on the wire: a real aiohttp server, a raw socket, the exact bytes answered."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from http import HTTPStatus

import orjson
import pytest
from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.test_utils import make_mocked_request

from shieldproxy import responses
from shieldproxy.checks.client_ip import _REQUEST_ID
from shieldproxy.context import RequestContext
from shieldproxy.decision import Decision, deny
from shieldproxy.limits.headers import ReserveFields
from shieldproxy.limits.reserve import Reserve
from shieldproxy.responses import WholeAnswer, deny_response, whole_answer

WAIT = 3.0  # seconds: the bound on every network wait
DATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")
GET = b"GET /v1/items HTTP/1.1\r\nHost: gw.test\r\n\r\n"


@dataclass
class Answer:
    """One parsed HTTP answer as the client received it."""

    status_line: str
    fields: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [value for field, value in self.fields if field.lower() == name.lower()]

    def value(self, name: str) -> str:
        (value,) = self.values(name)
        return value


@dataclass
class Served:
    """The server's port and the responses its handler returned (to see which path ran)."""

    port: int
    responses: list[web.StreamResponse]


@asynccontextmanager
async def serving(
    decision: Decision, response_headers: list[tuple[str, str]] | None = None
) -> AsyncIterator[Served]:
    """A real low-level aiohttp server on a free loopback port answering every request with
    deny_response(decision), as the handler does."""
    responses: list[web.StreamResponse] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        ctx = RequestContext(request, "req-1", 0.0)
        if response_headers is not None:
            ctx.response_headers = list(response_headers)
        response = deny_response(ctx, decision)
        responses.append(response)
        return response

    runner = web.ServerRunner(web.Server(handler))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield Served(port, responses)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(ConnectionError):
            await asyncio.wait_for(writer.wait_closed(), WAIT)


async def read_answer(reader: asyncio.StreamReader, *, head_only: bool = False) -> Answer:
    """One answer, framed by its Content-Length (no body is read for a HEAD request)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    fields = []
    for line in lines:
        name, sep, value = line.partition(":")
        assert sep, f"not a field line: {line!r}"
        fields.append((name, value.strip()))
    answer = Answer(status_line, fields, b"")
    if not head_only:
        answer.body = await asyncio.wait_for(
            reader.readexactly(int(answer.value("Content-Length"))), WAIT
        )
    return answer


async def exchange(port: int, request: bytes, *, head_only: bool = False) -> Answer:
    async with connection(port) as (reader, writer):
        writer.write(request)
        return await read_answer(reader, head_only=head_only)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True when the server closes the connection (EOF, with no stray bytes) within WAIT."""
    try:
        return await asyncio.wait_for(reader.read(1), WAIT) == b""
    except ConnectionResetError:
        return True


def error_body(code: str, message: str) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "request_id": "req-1"}}


def assert_no_duplicate_fields(answer: Answer) -> None:
    names = [name.lower() for name, _ in answer.fields]
    assert len(names) == len(set(names)), answer.fields


async def test_denial_is_the_contract_body_with_the_fixed_fields() -> None:
    """The whole answer: status line, the JSON error body and every field a client relies on."""
    decision = deny(403, "forbidden", "Key not allowed here", headers=(("X-Shield-Rule", "r1"),))
    async with serving(decision) as served:
        answer = await exchange(served.port, GET)
    assert isinstance(served.responses[0], WholeAnswer)  # the fast path, not the fallback
    assert answer.status_line == "HTTP/1.1 403 Forbidden"
    assert orjson.loads(answer.body) == error_body("forbidden", "Key not allowed here")
    assert answer.value("Content-Type") == "application/json"
    assert answer.value("Server") == "shieldproxy"
    assert answer.value("X-Request-Id") == "req-1"
    assert answer.value("X-Shield-Rule") == "r1"
    assert DATE.fullmatch(answer.value("Date"))
    assert int(answer.value("Content-Length")) == len(answer.body)
    assert answer.values("Connection") == []  # HTTP/1.1 keep-alive is the default
    assert_no_duplicate_fields(answer)


async def test_body_length_counts_bytes_not_characters() -> None:
    """Content-Length is the encoded body's length, so a non-ASCII message must not
    truncate or overrun the body."""
    decision = deny(403, "forbidden", "Zugriff verweigert: Schlüssel ungültig ✗")
    async with serving(decision) as served:
        answer = await exchange(served.port, GET)
    assert orjson.loads(answer.body) == error_body(
        "forbidden", "Zugriff verweigert: Schlüssel ungültig ✗"
    )
    assert int(answer.value("Content-Length")) == len(answer.body)


async def test_retry_after_replaces_the_decisions_own_field() -> None:
    """decision.retry_after is the authoritative value: one Retry-After, never two."""
    decision = deny(
        429, "rate_limited", "Slow down", headers=(("retry-after", "9"),), retry_after=5
    )
    async with serving(decision) as served:
        answer = await exchange(served.port, GET)
    assert answer.status_line == "HTTP/1.1 429 Too Many Requests"
    assert answer.values("Retry-After") == ["5"]
    assert_no_duplicate_fields(answer)


async def test_context_headers_replace_earlier_fields_case_insensitively() -> None:
    """Fields added by earlier checks win over the decision's and its Retry-After, and a
    replaced field is not also sent under its old spelling."""
    decision = deny(
        429,
        "rate_limited",
        "Slow down",
        headers=(("X-RateLimit-Remaining", "3"), ("Retry-After", "9"), ("X-Keep", "k")),
        retry_after=5,
    )
    added = [("x-ratelimit-remaining", "0"), ("RETRY-AFTER", "7"), ("X-Added", "a")]
    async with serving(decision, added) as served:
        answer = await exchange(served.port, GET)
    assert answer.values("X-RateLimit-Remaining") == ["0"]
    assert answer.values("Retry-After") == ["7"]
    assert answer.values("X-Keep") == ["k"]
    assert answer.values("X-Added") == ["a"]
    assert answer.value("X-Request-Id") == "req-1"
    assert_no_duplicate_fields(answer)


async def test_unauthorized_gets_a_bearer_challenge() -> None:
    """RFC 9110 §15.5.2: a 401 must carry WWW-Authenticate."""
    async with serving(deny(401, "unauthorized", "Missing API key")) as served:
        answer = await exchange(served.port, GET)
    assert answer.status_line == "HTTP/1.1 401 Unauthorized"
    assert answer.values("WWW-Authenticate") == ["Bearer"]


async def test_unauthorized_keeps_the_decisions_own_challenge() -> None:
    """A decision that names its challenge is not given a second, default one."""
    decision = deny(
        401, "unauthorized", "Bad key", headers=(("www-authenticate", 'Bearer error="invalid"'),)
    )
    async with serving(decision) as served:
        answer = await exchange(served.port, GET)
    assert answer.values("WWW-Authenticate") == ['Bearer error="invalid"']
    assert_no_duplicate_fields(answer)


async def test_head_gets_the_same_head_and_no_body() -> None:
    """A HEAD answer announces the GET body's length but sends no body bytes: a stray body
    would be read as the start of the next answer on the connection."""
    decision = deny(403, "forbidden", "No")
    async with serving(decision) as served, connection(served.port) as (reader, writer):
        writer.write(b"HEAD /v1/items HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        head = await read_answer(reader, head_only=True)
        writer.write(GET)  # the next bytes on the connection must be the GET's answer
        get = await read_answer(reader)
    assert head.status_line == "HTTP/1.1 403 Forbidden"
    assert int(head.value("Content-Length")) == len(get.body)
    assert orjson.loads(get.body) == error_body("forbidden", "No")
    assert get.status_line == "HTTP/1.1 403 Forbidden"


async def test_http11_connection_answers_two_requests() -> None:
    """HTTP/1.1 keeps the connection by default: a second request is answered on it."""
    async with (
        serving(deny(403, "forbidden", "No")) as served,
        connection(served.port) as (reader, writer),
    ):
        writer.write(GET)
        first = await read_answer(reader)
        writer.write(GET)
        second = await read_answer(reader)
    assert first.status_line == second.status_line == "HTTP/1.1 403 Forbidden"
    assert first.body == second.body


async def test_http11_client_close_is_honoured() -> None:
    """A client that asks to close gets Connection: close and the server closes."""
    async with (
        serving(deny(403, "forbidden", "No")) as served,
        connection(served.port) as (reader, writer),
    ):
        writer.write(b"GET / HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
        answer = await read_answer(reader)
        assert await closed_by_server(reader)
    assert answer.values("Connection") == ["close"]


async def test_http10_keep_alive_is_answered_in_http10_and_kept() -> None:
    """An HTTP/1.0 client only keeps a connection it is told is kept: the answer must say
    HTTP/1.0 and Connection: keep-alive, and the connection must serve a second request."""
    request = b"GET /v1/items HTTP/1.0\r\nHost: gw.test\r\nConnection: keep-alive\r\n\r\n"
    async with (
        serving(deny(403, "forbidden", "No")) as served,
        connection(served.port) as (reader, writer),
    ):
        writer.write(request)
        first = await read_answer(reader)
        writer.write(request)
        second = await read_answer(reader)
    for answer in (first, second):
        assert answer.status_line == "HTTP/1.0 403 Forbidden"
        assert answer.values("Connection") == ["keep-alive"]
        assert orjson.loads(answer.body) == error_body("forbidden", "No")


async def test_http10_without_keep_alive_is_closed() -> None:
    """HTTP/1.0 closes by default: no keep-alive field, and the server closes."""
    async with (
        serving(deny(403, "forbidden", "No")) as served,
        connection(served.port) as (reader, writer),
    ):
        writer.write(b"GET / HTTP/1.0\r\nHost: gw.test\r\n\r\n")
        answer = await read_answer(reader)
        assert await closed_by_server(reader)
    assert answer.status_line == "HTTP/1.0 403 Forbidden"
    assert answer.values("Connection") in ([], ["close"])


@pytest.mark.parametrize("status", [400, 405, 408, 413, 414, 431])
@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_statuses_that_leave_the_request_unread_close_the_connection(
    status: int, version: str
) -> None:
    """After these the rest of the request is unread (or not HTTP at all), so the connection
    cannot carry another request: the answer says close and the server closes, even when
    the client asked to keep it."""
    request = f"POST / HTTP/{version}\r\nHost: gw.test\r\nConnection: keep-alive\r\n\r\n"
    async with (
        serving(deny(status, "refused", "No")) as served,
        connection(served.port) as (reader, writer),
    ):
        writer.write(request.encode())
        answer = await read_answer(reader)
        assert await closed_by_server(reader)
    assert answer.status_line == f"HTTP/{version} {status} {HTTPStatus(status).phrase}"
    if version == "1.1":
        assert answer.values("Connection") == ["close"]
    else:
        assert answer.values("Connection") == []  # 1.0 closes unless told keep-alive
    assert orjson.loads(answer.body) == error_body("refused", "No")


async def test_status_without_a_reason_phrase_falls_back_to_aiohttp() -> None:
    """A status outside HTTPStatus has no precomputed status line: aiohttp's Response
    answers it, with the same body and fields."""
    async with serving(deny(599, "upstream_odd", "Odd")) as served:
        answer = await exchange(served.port, GET)
    assert not isinstance(served.responses[0], WholeAnswer)
    assert answer.status_line.startswith("HTTP/1.1 599")
    assert orjson.loads(answer.body) == error_body("upstream_odd", "Odd")
    assert answer.value("Content-Type") == "application/json"
    assert answer.value("Server") == "shieldproxy"
    assert answer.value("X-Request-Id") == "req-1"
    assert DATE.fullmatch(answer.value("Date"))


async def test_fallback_keeps_the_same_field_precedence() -> None:
    """Which path answers must not change what the client is told to wait."""
    decision = deny(599, "odd", "Odd", headers=(("Retry-After", "9"),), retry_after=5)
    async with serving(decision) as served:
        answer = await exchange(served.port, GET)
    assert not isinstance(served.responses[0], WholeAnswer)
    assert answer.values("Retry-After") == ["5"]


INJECTED = "X-Injected"


async def _assert_not_injected(
    decision: Decision, response_headers: list[tuple[str, str]] | None
) -> bytes:
    """The answer must never contain the injected field line, whatever else happens.
    Returns every byte the client received before the server closed."""
    async with (
        serving(decision, response_headers) as served,
        connection(served.port) as (reader, writer),
    ):
        writer.write(b"GET / HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
        received = b""
        try:
            while chunk := await asyncio.wait_for(reader.read(65536), WAIT):
                received += chunk
        except ConnectionResetError:
            pass
    assert INJECTED.encode() not in received, received
    assert not isinstance(served.responses[0], WholeAnswer)
    return received


@pytest.mark.parametrize(
    ("headers", "added"),
    [
        pytest.param(((("X-A", f"a\n{INJECTED}: 1"),)), None, id="lf-in-value"),
        pytest.param(((("X-A", f"a\r{INJECTED}: 1"),)), None, id="lone-cr-in-value"),
        pytest.param(((("X-A", "a\n"),)), None, id="trailing-lf"),
        pytest.param((), [("X-A", f"a\n{INJECTED}: 1")], id="lf-in-context-header"),
    ],
)
async def test_bare_cr_or_lf_in_a_field_is_refused(
    headers: tuple[tuple[str, str], ...],
    added: list[tuple[str, str]] | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A field value with a bare CR or LF takes the validating fallback, where aiohttp
    refuses it: the client gets no answer (the connection closes), never a forged field."""
    received = await _assert_not_injected(deny(403, "forbidden", "No", headers=headers), added)
    assert received == b""  # aiohttp raised while serialising: nothing was written
    assert "header injection" in caplog.text  # aiohttp's refusal, not some other failure


@pytest.mark.parametrize(
    ("headers", "added"),
    [
        pytest.param(((("X-A", f"a\r\n{INJECTED}: 1"),)), None, id="crlf-in-value"),
        pytest.param(((("X-A\r\n" + INJECTED, "1"),)), None, id="crlf-in-name"),
        pytest.param((), [("X-A", f"a\r\n{INJECTED}: 1")], id="crlf-in-context-header"),
    ],
)
async def test_crlf_in_a_field_is_refused(
    headers: tuple[tuple[str, str], ...], added: list[tuple[str, str]] | None
) -> None:
    """A CRLF pair is the most direct header injection of all: it must be refused too."""
    await _assert_not_injected(deny(403, "forbidden", "No", headers=headers), added)


@pytest.mark.parametrize("byte", [0x00, 0x01, 0x08, 0x0B, 0x0C, 0x1B, 0x1F, 0x7F])
def test_control_bytes_in_fields_are_left_to_aiohttps_checks(byte: int) -> None:
    """Bytes some clients read as line ends, or that aiohttp's Response refuses, never go out
    in a whole answer (it says None, and the caller falls back)."""
    request = make_mocked_request("GET", "/")
    ok = whole_answer(request, 200, b"X-A: a\tb\r\n", 1, b"", keep_alive=True)
    assert isinstance(ok, WholeAnswer)  # tab is allowed
    bad = b"X-A: a%cb\r\n" % byte
    assert whole_answer(request, 200, bad, 1, b"", keep_alive=True) is None


def test_line_ends_must_be_crlf_pairs_not_just_as_many_crs_as_lfs() -> None:
    """LF then CR inside a value has the right counts of both, and is still no line end."""
    request = make_mocked_request("GET", "/")
    bad = b"X-A: a\n\rX-B: forged\r\n"
    assert whole_answer(request, 200, bad, 2, b"", keep_alive=True) is None
    good = b"X-A: a\r\nX-B: b\r\n"
    assert isinstance(whole_answer(request, 200, good, 2, b"", keep_alive=True), WholeAnswer)


async def test_a_decision_reused_for_many_answers_gives_the_same_fields() -> None:
    """A flood is answered from one cached Decision: every answer carries its fields, with
    its own request id, exactly as a fresh decision's would."""
    headers = (("RateLimit", '"per-key";r=0;t=30'), ("Retry-After", "30"))
    reused = deny(429, "rate_limited", "rate limit exceeded", headers=headers)
    async with serving(reused) as served:
        first = await exchange(served.port, GET)
        second = await exchange(served.port, GET)
    assert isinstance(served.responses[1], WholeAnswer)
    expected = [
        ("Content-Type", "application/json"),
        ("Server", "shieldproxy"),
        ("X-Request-Id", "req-1"),
        *headers,
        ("Content-Length", str(len(first.body))),
    ]
    for answer in (first, second):
        assert [f for f in answer.fields if f[0] != "Date"] == expected


def test_rendered_fields_and_pairs_both_reach_a_later_denial() -> None:
    """A request admitted from reserves carries its rate-limit fields as rendered lines
    (ReserveFields), other checks' as pairs; an answer built later (a fault after the
    limits admitted) sends each of them exactly once, the lines first."""
    reserve = Reserve(base=90, left=5, reset_at=10.0)
    fields = ReserveFields('"per-ip";q=100;w=60', [(0, '"per-ip"', 100)], legacy=True)
    ctx = RequestContext(make_mocked_request("GET", "/"), "req-1", 0.0)
    ctx.response_fields += fields.render([reserve], now=0.0, epoch=0)
    ctx.add_response_headers([("X-Shield-Degraded", "store")])
    assert ctx.added_headers() == [
        ("RateLimit-Policy", '"per-ip";q=100;w=60'),
        ("RateLimit", '"per-ip";r=95;t=10'),
        ("X-RateLimit-Limit", "100"),
        ("X-RateLimit-Remaining", "95"),
        ("X-RateLimit-Reset", "10"),
        ("X-Shield-Degraded", "store"),
    ]
    answer = deny_response(ctx, deny(502, "upstream_unavailable", "down"))
    assert isinstance(answer, WholeAnswer)
    head = answer._raw.split(b"\r\n\r\n", 1)[0].decode()
    for name, value in ctx.added_headers():
        assert head.count(f"\r\n{name}: ") == 1
        assert f"\r\n{name}: {value}\r\n" in head + "\r\n"


@pytest.mark.parametrize(
    "decision",
    [
        deny(429, "rate_limited", "rate limit exceeded", headers=(("RateLimit", '"k";r=0;t=9'),)),
        deny(429, "rate_limited", "100% used", headers=(("X-Note", "50%d"),), retry_after=9),
        deny(401, "invalid_key", "the API key is not valid"),
        deny(401, "invalid_key", "no", headers=(("WWW-Authenticate", 'Bearer realm="x"'),)),
        deny(503, "store_unavailable", "down", retry_after=1),
        deny(403, "insufficient_scope", "the API key lacks the scope: wr\u00efte"),
    ],
)
@pytest.mark.parametrize("request_id", ["1271e52fda5b000000a910", "proxy.id:7-a"])
def test_a_laid_out_answer_is_the_general_one_byte_for_byte(
    decision: Decision, request_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep-alive HTTP/1.1 denials are answered from bytes laid out once per decision; they
    must be exactly what the general path builds for the same request id."""
    monkeypatch.setattr(responses, "rfc822_formatted_time", lambda: "Sat, 21 Nov 2026 23:55:40 GMT")

    def answer() -> bytes:
        ctx = RequestContext(make_mocked_request("GET", "/v1/items"), request_id, 0.0)
        response = deny_response(ctx, decision)
        assert isinstance(response, WholeAnswer)
        return response._raw

    general = answer()  # a decision's first answer takes the general path
    laid_out = answer()
    assert responses._LAYOUTS[id(decision)][1] is not None, "the second was laid out"
    assert laid_out == general


def test_denials_built_per_request_never_push_a_floods_layout_out() -> None:
    flood = deny(429, "rate_limited", "rate limit exceeded", retry_after=30)

    def answer(decision: Decision) -> WholeAnswer:
        ctx = RequestContext(make_mocked_request("GET", "/v1/items"), "r-1", 0.0)
        response = deny_response(ctx, decision)
        assert isinstance(response, WholeAnswer)
        return response

    answer(flood)
    answer(flood)
    assert responses._LAYOUTS[id(flood)][0] is flood
    for n in range(2 * responses._MAX_DECISIONS):  # e.g. a missing scope, built each time
        answer(deny(403, "insufficient_scope", f"the API key lacks the scope: s{n}"))
    assert responses._LAYOUTS[id(flood)][0] is flood
    assert len(responses._SEEN) <= responses._MAX_DECISIONS


def test_a_proxys_request_id_is_ascii_that_json_leaves_as_it_is() -> None:
    """The laid-out answer splices the request id in as ASCII, unescaped, in the body too:
    only ids the trusted-proxy pattern admits (and our hex ids) may reach it."""
    admitted = [chr(c) for c in range(0x250) if _REQUEST_ID.fullmatch(chr(c))]
    assert admitted and all(c.isascii() for c in admitted)
    assert all(orjson.dumps(c) == f'"{c}"'.encode() for c in admitted)


@pytest.mark.parametrize(
    ("method", "version", "closing", "decision"),
    [
        ("HEAD", HttpVersion11, False, deny(429, "rate_limited", "rate limit exceeded")),
        ("GET", HttpVersion11, True, deny(429, "rate_limited", "rate limit exceeded")),
        ("GET", HttpVersion10, False, deny(429, "rate_limited", "rate limit exceeded")),
        ("GET", HttpVersion11, False, deny(400, "bad_request", "bad")),  # closes: rest unread
    ],
)
def test_answers_that_differ_per_request_take_the_general_path(
    method: str, version: HttpVersion, closing: bool, decision: Decision
) -> None:
    request = make_mocked_request(method, "/v1/items", version=version, closing=closing)
    response = deny_response(RequestContext(request, "r-1", 0.0), decision)
    assert isinstance(response, WholeAnswer)
    entry = responses._LAYOUTS.get(id(decision))
    assert entry is None or entry[0] is not decision or entry[1] is None


def test_a_whole_answer_is_a_response_whose_fields_are_already_written() -> None:
    """aiohttp reads its status and keep-alive; its fields live in its bytes, so the header
    map it shows is empty and refuses additions rather than silently dropping them."""
    answer = WholeAnswer(429, b"HTTP/1.1 429 Too Many Requests\r\n\r\n", keep_alive=False)
    assert (answer.status, answer.reason, answer.keep_alive) == (429, "Too Many Requests", False)
    assert not answer.headers and len(answer) == 0 and answer
    with pytest.raises(TypeError):
        answer.headers["X-Late"] = "1"  # type: ignore[index]
    with pytest.raises(TypeError):
        answer[web.ResponseKey("key", str)] = "value"
    assert not WholeAnswer(200, b"", keep_alive=True).headers  # nothing shared leaked
