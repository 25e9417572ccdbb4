"""A Unix-socket proxy in front of the Docker daemon that holds chosen requests back.

Point an ``ExecutorHost`` at ``proxy.url`` and every call goes through here to the real
daemon; requests whose first line matches ``delay_pattern`` wait ``delay`` seconds before
they are forwarded. That is a slow daemon (or a slow image pull) seen from outside the
app: nothing in the app's own code is replaced.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path


class DockerProxy:
    def __init__(
        self,
        upstream: str = "/var/run/docker.sock",
        delay: float = 0.0,
        delay_pattern: str = r"^$",
    ) -> None:
        self.upstream = upstream
        self.delay = delay
        self.delay_pattern = re.compile(delay_pattern.encode())
        self._dir = tempfile.mkdtemp(prefix="dcc-proxy-")
        self.path = str(Path(self._dir) / "docker.sock")
        self.delayed: list[str] = []  # first lines of the requests held back
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def __enter__(self) -> DockerProxy:
        self._server.bind(self.path)
        self._server.listen(64)
        threading.Thread(target=self._accept, name="docker-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._server.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self._dir)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                daemon.connect(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, daemon]
            threading.Thread(target=self._pump, args=(client, daemon, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(daemon, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, requests: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if requests:
                    # The SDK sends each request's head in one write, so a request starts
                    # a chunk; its first line says what it is.
                    first_line = data.split(b"\r\n", 1)[0]
                    if self.delay_pattern.search(first_line):
                        self.delayed.append(first_line.decode(errors="replace"))
                        time.sleep(self.delay)
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)
