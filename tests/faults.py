"""Faults to inject into a deployment: a TCP proxy to cut a service off, and a redis-server of one's own to
crash or restart. Shared by the reliability tests and the soak (benchmarks/soak.py); no pytest here.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TcpProxy:
    """A TCP forwarder from a loopback port to `target`, to cut a service off from a worker.

    While `cut()` lasts, the port is closed (connections are refused) and the open connections are
    dropped, as when the server goes away; afterwards the same port forwards again.
    """

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)  # the accept loop looks at the stop flag this often
        self.port = listener.getsockname()[1]
        self._stop.clear()
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._listener is not None:
            self._listener.close()
        self._listener = self._thread = None
        with self._lock:
            dropped, self._connections = self._connections, set()
        for conn in dropped:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes its pump, which closes it

    @contextmanager
    def cut(self) -> Iterator[None]:
        self.close()
        try:
            yield
        finally:
            self.open()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._connections |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            with suppress(OSError):  # either side closing ends the pump
                while data := src.recv(65536):
                    dst.sendall(data)
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            src.close()
            with self._lock:
                self._connections.discard(src)


class PrivateRedis:
    """A redis-server of one's own on a free loopback port, to crash or restart.

    `appendonly`: keep every write in an append-only file, as a lab's Redis should, so a restart keeps the
    queue; without it, the server keeps nothing on disk and a crash loses every message.
    """

    def __init__(self, folder: Path, *, appendonly: bool = False):
        import redis

        self.exe = shutil.which("redis-server")
        if self.exe is None:
            raise FileNotFoundError("redis-server is not installed")
        self.folder = folder
        self.appendonly = appendonly
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port, socket_connect_timeout=2)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, timeout_s: float = 20) -> None:
        import redis

        with (self.folder / "redis.log").open("a") as log:
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                 "--daemonize", "no", "--dir", str(self.folder)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with suppress(redis.RedisError):
                if self.client.ping():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not answer within {timeout_s} s")
            time.sleep(0.2)

    def crash(self) -> None:
        """SIGKILL, as a machine that loses power: what it had not written to disk is gone."""
        self.proc.kill()
        self.proc.wait()
        self.client.connection_pool.disconnect()

    def restart(self, down_s: float = 0.0) -> None:
        """A clean stop (SIGTERM: the append-only file is flushed), `down_s` seconds away, a start."""
        self.proc.terminate()
        self.proc.wait(30)
        self.client.connection_pool.disconnect()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.crash()
        self.client.close()
