"""How a pool call's requests and results cross the actor boundary: one msgpack buffer each way.

Pickling a merged call object by object (its ~100 requests per prompt, each a request, its sampling,
a tuple and its message dicts, and as many results back) was the largest single cost of both the
stage actors and the replicas in benchmarks.engine_overhead. msgspec encodes the same Structs in C,
and decodes them typed (a malformed buffer is an error, never a half-built request). Methods without
a codec here (`update_weights`: tensors) go through Ray's own pickling unchanged.
"""

from __future__ import annotations

from typing import Any, Optional

import msgspec

from actors.backend import ChatRequest, ChatResult, ClassifyRequest, NextTokenRequest, ScoreResult

_encoder = msgspec.msgpack.Encoder()
_requests = {
    "chat": msgspec.msgpack.Decoder(list[ChatRequest]),
    "next_token_logprobs": msgspec.msgpack.Decoder(list[NextTokenRequest]),
    "classify": msgspec.msgpack.Decoder(list[ClassifyRequest]),
}
# A cancelled caller's part comes back as None per request (`ModelReplica.cancel`).
_results = {
    "chat": msgspec.msgpack.Decoder(list[Optional[ChatResult]]),
    "next_token_logprobs": msgspec.msgpack.Decoder(list[Optional[ScoreResult]]),
    "classify": msgspec.msgpack.Decoder(list[Optional[ScoreResult]]),
}


def encode_requests(method: str, requests: list) -> Any:
    """The payload of a call to `method`: bytes for a method with a codec, else `requests` as they are.
    Text that UTF-8 cannot hold (a lone surrogate) raises `UnicodeEncodeError` here, in the caller."""
    return _encoder.encode(requests) if method in _requests else requests


def decode_requests(method: str, payload: Any) -> list:
    return _requests[method].decode(payload) if method in _requests else payload


def encode_results(method: str, results: list) -> Any:
    return _encoder.encode(results) if method in _results else results


def decode_results(method: str, payload: Any) -> list:
    return _results[method].decode(payload) if method in _results else payload
