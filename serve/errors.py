"""Structured encoder errors: what crosses from an encoder replica to the ingress instead of an exception.

An encoder never raises across Ray for bad input; it returns ``{"error": {"code", "message", "status"}}``.
``code`` is short and stable (it is the ``reason`` tag of ``emotion_dropped_modalities_total``),
``status`` is the HTTP status the ingress answers when no modality could be used.
"""

from __future__ import annotations

from typing import Any, TypedDict

from models.inference import EmptyTextError
from models.media import (
    EmptyMediaError,
    MediaDecodeError,
    MediaError,
    MediaTimeoutError,
    NoAudioStreamError,
    NoVideoStreamError,
)


class EncoderError(TypedDict):
    code: str
    message: str
    status: int


# Most specific first: the first matching class wins.
_ERROR_CODES: tuple[tuple[type[Exception], str, int], ...] = (
    (EmptyTextError, "empty_text", 422),
    (EmptyMediaError, "empty_media", 400),
    (NoAudioStreamError, "no_audio_stream", 400),
    (NoVideoStreamError, "no_video_stream", 400),
    (MediaTimeoutError, "decode_timeout", 400),
    (MediaDecodeError, "decode_error", 400),
    (MediaError, "bad_media", 400),
)


def encoder_error(code: str, message: str, status: int) -> dict[str, Any]:
    """The error payload an encoder returns."""
    return {"error": EncoderError(code=code, message=message, status=status)}


def error_from_exception(exc: BaseException) -> dict[str, Any]:
    """Map an input error to its payload; anything unexpected is an ``internal`` 500 (message kept short)."""
    for cls, code, status in _ERROR_CODES:
        if isinstance(exc, cls):
            return encoder_error(code, str(exc) or code.replace("_", " "), status)
    return encoder_error("internal", f"{type(exc).__name__}: {str(exc)[:200]}", 500)


def is_client_error(err: EncoderError) -> bool:
    """True when the input itself was at fault (4xx)."""
    return 400 <= err["status"] < 500
