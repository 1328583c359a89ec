"""A round-robin TCP load balancer for the interop run: each new client connection goes to the
next backend in turn, so a client's requests (on its several connections) reach every
replica, as behind a load balancer without session affinity. Counts connections per backend.

    python3 roundrobin.py LISTEN_PORT BACKEND_HOST:PORT [BACKEND_HOST:PORT ...]
"""

import asyncio
import itertools
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    port = int(sys.argv[1])
    backends = itertools.cycle([tuple(b.rsplit(":", 1)) for b in sys.argv[2:]])
    counts = {}

    async def handle(client_r, client_w):
        host, bport = next(backends)
        counts[bport] = counts.get(bport, 0) + 1
        print(f"connection to {host}:{bport} ({counts[bport]})", flush=True)
        try:
            server_r, server_w = await asyncio.open_connection(host, int(bport))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


asyncio.run(main())
