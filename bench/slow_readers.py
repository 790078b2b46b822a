#!/usr/bin/env python3
"""Slow readers: CLIENTS connections ask the gateway for something large and never read.

Run by bench/slow-readers.sh, which starts the gateway; this script is the upstream and
the clients. Usage: slow_readers.py upstream PORT | attack GATEWAY_PID PUBLIC ADMIN UPSTREAM
CLIENTS HOLD PHASE...

The upstream (asyncio, stdlib only) serves:
- /_render/big: a 1 MB fragment of control bytes (six times its size escaped as JSON);
- /_render/small: a 10 KB fragment;
- /page: an ESI page of 20 KB including /fragments/small;
- /download: 20 MB, as fast as it is taken;
and answers /count with how many connections are open to it.

Each phase opens CLIENTS connections (receive buffer 4 KiB), sends one request on each,
never reads, and samples the gateway's RSS (from /proc) every 0.5 s for HOLD seconds, then
waits until the gateway has closed them all (its public connection gauge, at most 120 s).
Printed per phase: RSS before, the peak while held and after, what the peak adds, the
upstream connections open while held and after, and when the gateway had closed them.
"""

import asyncio
import re
import socket
import sys
import time
import urllib.request

BIG = b"\x01" * (1024 * 1024 - 4096)
SMALL = b"<p>" + b"x" * 10_000 + b"</p>"
PAGE = (b"<html><body>" + b"<p>text</p>" * 1800
        + b'<esi:include src="/fragments/small"/></body></html>')
DOWNLOAD = 20 * 1024 * 1024

open_now = 0


async def serve_upstream(reader, writer):
    global open_now
    open_now += 1
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            if path.startswith("/_render/big"):
                await answer(writer, BIG, b"text/html")
            elif path.startswith("/_render/small"):
                await answer(writer, SMALL, b"text/html")
            elif path.startswith("/page"):
                await answer(writer, PAGE, b"text/html",
                             b'Surrogate-Control: content="ESI/1.0"\r\n')
            elif path.startswith("/download"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                             b"content-length: %d\r\n\r\n" % DOWNLOAD)
                chunk = b"x" * 65536
                for _ in range(DOWNLOAD // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
            elif path.startswith("/count"):
                await answer(writer, str(open_now - 1).encode(), b"text/plain")
            else:
                await answer(writer, b"not found", b"text/plain", status=b"404 Not Found")
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        open_now -= 1
        writer.close()


async def answer(writer, body, ctype, extra=b"", status=b"200 OK"):
    writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype + b"\r\n"
                 b"cache-control: public, max-age=60\r\n" + extra
                 + b"content-length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()


def upstream(port):
    async def main():
        server = await asyncio.start_server(serve_upstream, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def gauge(admin):
    text = get(f"http://127.0.0.1:{admin}/metrics").decode()
    m = re.search(r'^tessera_http_connections\{listener="public"\} (\S+)', text, re.M)
    return float(m.group(1)) if m else 0.0


PATHS = {
    "fragment": "/fragments/big",
    "stream": "/_tessera/stream?" + "&".join(
        f"src=%2Ffragments%2Fbig%3Fjunk%3D{n}" for n in range(32)),
    "page": "/page",
    "download": "/download",
}


def attack(pid, public, admin, up, clients, hold, phases):
    # Warm the fragments, so every phase serves what is cached.
    for name in ("big", "small"):
        req = urllib.request.Request(f"http://127.0.0.1:{public}/fragments/{name}",
                                     headers={"Prefer": "wait=20"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200, (name, r.status)
            r.read()
    print(f"{'phase':<9} {'clients':>7} {'RSS before':>10} {'peak':>7} {'adds':>7} "
          f"{'after':>7} {'upstream held':>13} {'after':>5} {'all closed':>10}")
    for phase in phases:
        path = PATHS[phase]
        before = rss_mb(pid)
        socks = []
        for _ in range(clients):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", public))
            s.sendall(f"GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n".encode())
            socks.append(s)
        started = time.monotonic()
        peak = before
        held = 0
        while time.monotonic() - started < hold:
            peak = max(peak, rss_mb(pid))
            held = max(held, int(get(f"http://127.0.0.1:{up}/count")))
            time.sleep(0.5)
        closed_at = None
        while time.monotonic() - started < hold + 120:
            peak = max(peak, rss_mb(pid))
            if gauge(admin) == 0:
                closed_at = time.monotonic() - started
                break
            time.sleep(0.5)
        after_up = int(get(f"http://127.0.0.1:{up}/count"))
        for s in socks:
            s.close()
        time.sleep(1)
        after = rss_mb(pid)
        closed = f"{closed_at:.0f} s" if closed_at is not None else "no"
        print(f"{phase:<9} {clients:>7} {before:>8.0f}MB {peak:>5.0f}MB {peak - before:>5.0f}MB "
              f"{after:>5.0f}MB {held:>13} {after_up:>5} {closed:>10}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "upstream":
        upstream(int(sys.argv[2]))
    else:
        pid, public, admin, up, clients, hold = map(int, sys.argv[2:8])
        attack(pid, public, admin, up, clients, hold, sys.argv[8:])
