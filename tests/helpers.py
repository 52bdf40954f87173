"""Backends and an in-process proxy for relay tests (the relay runs on the test's own loop)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from proxy.ground.flags import build_parser, config_from_args
from proxy.modes.publication import Publication

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every byte as it comes; close after the client's EOF."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def echo_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer only once the client has half-closed: proves the FIN went through alone."""
    data = await reader.read()
    writer.write(b"got:" + data)
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def backend(handler: Handler = echo, host: str = "127.0.0.1") -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, host, 0, backlog=4096)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def make_config(*argv: str) -> Any:
    return config_from_args(build_parser().parse_args(list(argv)))


@contextlib.asynccontextmanager
async def proxy(*argv: str) -> AsyncIterator[Publication]:
    """pyproxy serving in this process; `server.relays[i].port` are the bound ports."""
    server = Publication(make_config(*argv), None)
    await server.open()
    try:
        yield server
    finally:
        await server.close()


def tcp_proxy(backend_port: int, *extra: str, host_ip: str = "127.0.0.1",
              container_ip: str = "127.0.0.1") -> Any:
    """A context manager: pyproxy in this process in front of backend_port."""
    return proxy("-host-ip", host_ip, "-host-port", "0", "-container-ip", container_ip,
                 "-container-port", str(backend_port), *extra)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
