"""Narrowing the client's unions where a test knows what it gets.

``get_model`` answers a chat, generate or embedding handle, and ``generate``/``chat`` a dict or
a stream; a test that launched an LLM, or asked for no stream, says so here and fails with the
kind it got otherwise.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

from broker_client import (
    AsyncChatModelHandle,
    AsyncEmbeddingModelHandle,
    AsyncGenerateModelHandle,
    AsyncStream,
    ChatModelHandle,
    EmbeddingModelHandle,
    GenerateModelHandle,
    Stream,
)

AsyncHandle = AsyncChatModelHandle | AsyncGenerateModelHandle | AsyncEmbeddingModelHandle
SyncHandle = ChatModelHandle | GenerateModelHandle | EmbeddingModelHandle
S = TypeVar("S", AsyncStream, Stream)


@overload
def generating(handle: AsyncHandle) -> AsyncGenerateModelHandle: ...
@overload
def generating(handle: SyncHandle) -> GenerateModelHandle: ...
def generating(handle: AsyncHandle | SyncHandle) -> AsyncGenerateModelHandle | GenerateModelHandle:
    """An LLM's handle (chat or generate), for its ``generate``."""
    assert isinstance(handle, AsyncGenerateModelHandle | GenerateModelHandle), handle
    return handle


@overload
def chatting(handle: AsyncHandle) -> AsyncChatModelHandle: ...
@overload
def chatting(handle: SyncHandle) -> ChatModelHandle: ...
def chatting(handle: AsyncHandle | SyncHandle) -> AsyncChatModelHandle | ChatModelHandle:
    """A chat LLM's handle, for its ``chat``."""
    assert isinstance(handle, AsyncChatModelHandle | ChatModelHandle), handle
    return handle


def completed(reply: dict[str, Any] | AsyncStream | Stream) -> dict[str, Any]:
    """A reply asked for without ``stream``: the completion dict."""
    assert isinstance(reply, dict), reply
    return reply


def streamed(reply: dict[str, Any] | S) -> S:
    """A reply asked for with ``{"stream": True}``: its stream of chunks."""
    assert isinstance(reply, AsyncStream | Stream), reply
    return reply
