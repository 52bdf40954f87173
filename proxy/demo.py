"""`python -m proxy.demo`: see pyproxy do its job in one command.

Starts an HTTP backend on 127.0.0.1 (unless -container-ip/-container-port name one), runs
`pyproxy` in front of it with docker-proxy's exact command line and the fd 3 status pipe,
fetches a page through it, then keeps serving until Ctrl-C (or for -seconds).
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = f"hello from the backend; you came from {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.demo", description=__doc__)
    parser.add_argument("-container-ip", default=None, help="an existing backend (default: start one)")
    parser.add_argument("-container-port", type=int, default=None)
    parser.add_argument("-host-ip", default="127.0.0.1")
    parser.add_argument("-host-port", type=int, default=0, help="default: a free port")
    parser.add_argument("-seconds", type=float, default=0, help="stop after this long (0: Ctrl-C)")
    args = parser.parse_args()

    if args.container_port is None:
        backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
        threading.Thread(target=backend.serve_forever, daemon=True).start()
        args.container_ip, args.container_port = "127.0.0.1", backend.server_address[1]
        print(f"started an HTTP backend on 127.0.0.1:{args.container_port}")
    host_port = args.host_port or _free_port(args.host_ip)

    command = [sys.executable, "-m", "proxy", "-proto", "tcp", "-host-ip", args.host_ip,
               "-host-port", str(host_port), "-container-ip", args.container_ip or "127.0.0.1",
               "-container-port", str(args.container_port)]
    print("running:", " ".join(["pyproxy", *command[3:]]))
    status_read, status_write = os.pipe()
    # The child gets the pipe's write end as fd 3, as dockerd passes it. (subprocess closes
    # every fd not in pass_fds after preexec_fn, which also drops the original write end.)
    proc = subprocess.Popen(command, pass_fds=(3,), preexec_fn=lambda: os.dup2(status_write, 3))
    os.close(status_write)
    status = os.read(status_read, 4096)
    os.close(status_read)
    if status != b"0\n":
        print(f"pyproxy failed to start: {status[2:].decode(errors='replace')}", file=sys.stderr)
        proc.wait()
        return 1
    print("status pipe (fd 3) said: ready")

    url = f"http://{args.host_ip}:{host_port}/"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            print(f"GET {url} through pyproxy -> {response.status}: {response.read().decode().strip()}")
        ok = True
    except OSError as exc:
        print(f"GET {url} through pyproxy failed: {exc}", file=sys.stderr)
        ok = False

    print(f"pyproxy serves {url} (Ctrl-C to stop)" if not args.seconds else
          f"pyproxy serves {url} for {args.seconds:g}s")
    try:
        if args.seconds:
            time.sleep(args.seconds)
        else:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        proc.send_signal(signal.SIGINT)  # as dockerd stops it
        proc.wait(timeout=5)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
