"""Upload guards: the streaming body limit (413) and the media type check (415)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from serve.uploads import UnsupportedMedia, UploadLimitMiddleware, check_media, looks_like_text

FIXTURES = Path(__file__).resolve().parent / "fixtures"


class BodyReadingApp:
    """An ASGI app that reads the whole body, then answers 200 with how many bytes it got."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen = 0  # body bytes this app was handed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.calls += 1
        total, more = 0, True
        while more:
            message = await receive()
            total += len(message.get("body", b""))
            self.seen = total
            more = message.get("more_body", False)
        body = json.dumps({"received": total}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def run(
    app: Any, chunks: list[bytes], content_length: int | None, extra_headers: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[list[dict], int]:
    """Drive ``app`` with a request whose body arrives in ``chunks``; return sent messages and receive calls.

    Each sent message gets ``"pulled"``: how many receive calls had been made when it was sent.
    """
    headers = [(b"content-type", b"application/octet-stream"), *extra_headers]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "method": "POST", "path": "/predict/audio", "headers": headers}
    sent: list[dict] = []
    pulled = 0

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        if pulled > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message: dict) -> None:
        sent.append({**message, "pulled": pulled})

    asyncio.run(app(scope, receive, send))
    return sent, pulled


def status_and_body(sent: list[dict]) -> tuple[int, dict]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body)


def test_declared_length_over_limit_is_refused_before_reading() -> None:
    """With ``Expect: 100-continue`` the client waits for a go-ahead: answered at once, nothing read."""
    inner = BodyReadingApp()
    sent, pulled = run(
        UploadLimitMiddleware(inner, max_bytes=1000),
        [b"x" * 600] * 4,
        content_length=2400,
        extra_headers=((b"expect", b"100-continue"),),
    )
    status, body = status_and_body(sent)
    assert status == 413 and "upload limit" in body["detail"]
    assert pulled == 0 and inner.calls == 0  # nothing read, the app never ran
    assert (b"connection", b"close") in sent[0]["headers"]


def test_declared_length_over_limit_without_expect_is_answered_then_drained() -> None:
    """A client that sends its whole body before reading (urllib, requests) must not be reset: the 413 goes out
    first, the body is read and thrown away, then the response ends."""
    inner = BodyReadingApp()
    sent, pulled = run(UploadLimitMiddleware(inner, max_bytes=1000), [b"x" * 600] * 4, content_length=2400)
    status, body = status_and_body(sent)
    assert status == 413 and body == {"detail": "request body is larger than the 1000 bytes upload limit"}
    assert inner.calls == 0  # the application never saw the body
    start, first, last = sent
    assert start["pulled"] == 0 and first["pulled"] == 0 and first["more_body"] is True  # answered before reading
    assert pulled == 4 and last == {"type": "http.response.body", "body": b"", "pulled": 4}  # ended after the drain


def test_drain_is_bounded() -> None:
    """A declared length past ``drain_bytes`` is not drained at all; a chunked body stops being drained there."""
    sent, pulled = run(
        UploadLimitMiddleware(BodyReadingApp(), max_bytes=1000, drain_bytes=2000), [b"x" * 600] * 5, content_length=3000
    )
    assert status_and_body(sent)[0] == 413 and pulled == 0
    inner = BodyReadingApp()
    sent, pulled = run(
        UploadLimitMiddleware(inner, max_bytes=1000, drain_bytes=2000), [b"x" * 400] * 50, content_length=None
    )
    assert status_and_body(sent)[0] == 413
    assert inner.seen == 800 and pulled == 3 + 6  # 3 chunks to pass the limit, then 2400 > 2000 drained bytes


def test_streamed_body_is_stopped_as_soon_as_it_passes_the_limit() -> None:
    inner = BodyReadingApp()
    chunks = [b"x" * 400] * 50  # 20 kB, chunked (no Content-Length)
    sent, pulled = run(UploadLimitMiddleware(inner, max_bytes=1000, drain_bytes=100_000), chunks, content_length=None)
    status, body = status_and_body(sent)
    assert status == 413 and body["detail"].startswith("request body is larger")
    assert inner.seen == 800  # 400 + 400 + 400 > 1000: the app never got the third chunk
    assert pulled == 50 and sent[0]["pulled"] == 50  # the rest was read away before answering


def test_lying_content_length_is_still_caught() -> None:
    inner = BodyReadingApp()
    sent, pulled = run(UploadLimitMiddleware(inner, max_bytes=1000), [b"x" * 400] * 10, content_length=10)
    assert status_and_body(sent)[0] == 413 and inner.seen == 800 and pulled == 10


def test_body_within_limit_passes_untouched() -> None:
    sent, _ = run(
        UploadLimitMiddleware(BodyReadingApp(), max_bytes=1000), [b"x" * 500, b"y" * 500], content_length=1000
    )
    assert status_and_body(sent) == (200, {"received": 1000})


@pytest.mark.parametrize(
    ("field", "name", "content_type"),
    [
        ("audio", "speech.wav", "audio/wav"),
        ("audio", "face.mp4", "video/mp4"),  # a video's audio track
        ("audio", "speech.wav", "application/octet-stream"),
        ("audio", "speech.wav", None),
        ("video", "face.mp4", "video/mp4"),
        ("video", "face.png", "image/png"),  # a still image is a 1-frame video
        ("video", "corrupt.mp4", "video/mp4"),  # corrupt media is a 400 from the decoder, not a 415
    ],
)
def test_media_accepted(field: str, name: str, content_type: str | None) -> None:
    check_media(field, content_type, (FIXTURES / name).read_bytes()[:512])


@pytest.mark.parametrize(
    ("field", "head", "content_type", "reason"),
    [
        ("audio", b"hello, this is a plain text file\n", "text/plain", "content type 'text/plain'"),
        ("video", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "application/pdf", "content type 'application/pdf'"),
        ("audio", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "application/octet-stream", "PDF"),
        ("video", b"PK\x03\x04\x14\x00\x06\x00\x08\x00", None, "ZIP"),
        ("audio", "Bonjour, ceci est du texte accentué : éàü.".encode(), "application/octet-stream", "text"),
        ("audio", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png", "content type 'image/png'"),
    ],
)
def test_not_media_is_415(field: str, head: bytes, content_type: str | None, reason: str) -> None:
    with pytest.raises(UnsupportedMedia) as err:
        check_media(field, content_type, head)
    assert err.value.status_code == 415 and reason in err.value.detail


def test_looks_like_text() -> None:
    assert looks_like_text("ünïcödé text that is cut in the middle of a char".encode()[:-1] + "é".encode()[:1])
    assert not looks_like_text((FIXTURES / "speech.wav").read_bytes()[:512])
    assert not looks_like_text(b"short")
