"""A Unix-socket proxy in front of the test PostgreSQL that can lose the server's reply to one statement.

The hardest fault for a money write is the one where the server committed but the client never heard:
the caller cannot tell "not done" from "done". ``LossyProxy.lose_reply_to(marker)`` forwards the next
client message that contains ``marker`` (say an idempotency key in a Bind message), swallows the
server's whole answer up to its ReadyForQuery (so the autocommit statement has committed), then cuts
the client's connection. The client sees "server closed the connection unexpectedly".
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
import threading
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

_READY_FOR_QUERY = b"Z\x00\x00\x00\x05"  # type byte and length of ReadyForQuery; a status byte follows


class LossyProxy:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        host = parse_qs(parts.query).get("host", [""])[0]
        sockets = [p for p in glob.glob(os.path.join(host, ".s.PGSQL.*")) if not p.endswith(".lock")]
        if not host.startswith("/") or len(sockets) != 1:
            raise RuntimeError("LossyProxy needs a server on a Unix socket (the embedded test server)")
        self.target = sockets[0]
        port = self.target.rsplit(".", 1)[-1]
        self.dir = tempfile.mkdtemp(prefix="cr-proxy-")
        os.chmod(self.dir, 0o755)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.path.join(self.dir, f".s.PGSQL.{port}"))
        self.listener.listen(64)
        query = parse_qs(parts.query)
        query["host"] = [self.dir]
        self.url = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
        self._marker: bytes | None = None
        self._lock = threading.Lock()
        self.replies_lost = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_reply_to(self, marker: str) -> None:
        """Arm once: the next statement whose message contains ``marker`` runs, but its answer is lost."""
        with self._lock:
            self._marker = marker.encode()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            state = {"dropping": False}
            threading.Thread(target=self._client_to_server, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._server_to_client, args=(upstream, client, state), daemon=True).start()

    def _client_to_server(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    if self._marker is not None and self._marker in data:
                        self._marker = None
                        state["dropping"] = True
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(upstream)

    def _server_to_client(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        swallowed = b""
        try:
            while data := upstream.recv(65536):
                if not state["dropping"]:
                    client.sendall(data)
                    continue
                swallowed = (swallowed + data)[-64:]
                if swallowed[-6:-1] == _READY_FOR_QUERY:  # the statement is done (and committed): cut the client
                    with self._lock:
                        self.replies_lost += 1
                    break
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
