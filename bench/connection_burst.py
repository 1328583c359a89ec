#!/usr/bin/env python3
"""Opens N connections to a registry at once, each GETting PATH and reading the whole answer,
then closes them all: a burst like a fleet of hosts pulling at the same moment. Used to see
whether the server's memory comes back down afterwards (docs/benchmarks.md, "Memory after a
burst of connections").

usage: connection_burst.py PORT N PATH      (PATH must answer 200 with a Content-Length)
"""
import asyncio
import resource
import sys


async def one(port: int, path: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return writer


async def main(port: int, n: int, path: str):
    writers = await asyncio.gather(*[one(port, path) for _ in range(n)])
    for w in writers:
        w.close()


if __name__ == "__main__":
    port, n, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    want = n + 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    asyncio.run(main(port, n, path))
