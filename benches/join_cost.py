#!/usr/bin/env python3
"""What a per-room subscription costs a joining client, measured from outside.

Usage: python3 benches/join_cost.py WS_HOST:WS_PORT [N]

Against a running instance (for example one started by ./scripts/run_two.sh,
WebSocket port 15000), opens N WebSockets one after the other, each into a
room nobody is in (the instance must SUBSCRIBE to the room's channel and wait
for Redis's confirmation before it reads history), then N into one room that
is already subscribed, and prints the median and 90th percentile of the time
from the TCP connect to the `welcome` frame for both. Loopback only; standard
library only.
"""
import base64
import os
import socket
import statistics
import sys
import time


def join(host, port, room):
    start = time.perf_counter()
    sock = socket.create_connection((host, port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws?name=probe&room={room} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    data = b""
    while b'"welcome"' not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed before the welcome: {data[:200]!r}")
        data += chunk
    elapsed = time.perf_counter() - start
    return sock, elapsed


def summary(label, times):
    times = sorted(times)
    p50 = statistics.median(times) * 1000
    p90 = times[int(len(times) * 0.9)] * 1000
    print(f"{label:<28} p50 {p50:6.3f} ms   p90 {p90:6.3f} ms   ({len(times)} joins)")


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    port = int(port)
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    tag = f"{os.getpid()}"
    kept, fresh, existing = [], [], []
    for i in range(n):
        sock, elapsed = join(host, port, f"fresh-{tag}-{i}")
        kept.append(sock)
        fresh.append(elapsed)
    for _ in range(n):
        sock, elapsed = join(host, port, f"fresh-{tag}-0")
        kept.append(sock)
        existing.append(elapsed)
    summary("join a new room (SUBSCRIBE)", fresh)
    summary("join a subscribed room", existing)
    for sock in kept:
        sock.close()


if __name__ == "__main__":
    main()
