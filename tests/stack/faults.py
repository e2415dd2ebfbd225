"""What the fault tests inject into the running stack, and how they watch it."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx


class BlockableProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port``. While blocked it accepts each connection and
    resets it at once (a client sees ECONNRESET, as from a store that is down), counting them, and resets
    the connections already open. moto keeps its objects in memory, so S3 cannot be made unreachable by
    stopping it: this is the outage."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._blocked = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True, name="s3-proxy").start()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._blocked.is_set():
                with self._lock:
                    self.refused += 1
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                self._reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with self._lock:
                    self._open.discard(sock)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def block(self) -> None:
        self._blocked.set()
        with self._lock:
            open_now, self._open = list(self._open), set()
        for sock in open_now:
            try:
                self._reset(sock)
            except OSError:
                pass

    def unblock(self) -> None:
        self._blocked.clear()

    def close(self) -> None:
        self._listener.close()


@dataclass
class GatewayTraffic:
    """Calls the gateway one row at a time in a thread, keeping the request id of every 200 answer."""

    url: str
    key: str
    row: dict[str, Any]
    answered: list[str] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        payload = {"dataframe_records": [self.row]}
        with httpx.Client(timeout=10, trust_env=False) as client:
            while not self._stop.is_set():
                try:
                    answer = client.post(
                        self.url, json=payload, headers={"Authorization": f"Bearer {self.key}"}
                    )
                except httpx.HTTPError:
                    self.failed.append(0)
                    continue
                if answer.status_code == 200:
                    self.answered.append(answer.headers["X-Request-Id"])
                else:
                    self.failed.append(answer.status_code)
                time.sleep(0.05)

    @contextmanager
    def running(self) -> Iterator[GatewayTraffic]:
        thread = threading.Thread(target=self._run, daemon=True, name="gateway-traffic")
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=30)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, poll: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def running_task(
    api: Any, dag_id: str, task_id: str, since: datetime, states: tuple[str, ...] = ("running",)
) -> dict[str, Any] | None:
    """The first instance of ``task_id`` in a run of ``dag_id`` since ``since`` in one of ``states``."""
    for run in api.runs_since(dag_id, since):
        for ti in api.task_instances(dag_id, run["dag_run_id"]):
            if ti["task_id"] == task_id and ti["state"] in states:
                return {**ti, "dag_run_id": run["dag_run_id"]}
    return None


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def worker_running(run_dir: Path, workers: list[str], needle: str) -> str | None:
    """The worker service whose process tree runs a task whose command line names ``needle``."""
    import psutil

    from modelops_dev import processes

    for name in workers:
        leader = processes.read_pid(name, run_dir)
        if leader is None:
            continue
        for pid in _descendants(leader):
            try:
                if needle in " ".join(psutil.Process(pid).cmdline()):
                    return name
            except psutil.NoSuchProcess:
                continue
    return None


def sigkill_service(run_dir: Path, name: str) -> int:
    """Take ``name`` from the supervisor (so it is not restarted), then SIGKILL its every process: the
    worker and the task processes it forked, as when a machine's kernel kills it. Returns how many."""
    from modelops_dev import processes, supervision

    supervision.release(name, run_dir)
    leader = processes.read_pid(name, run_dir)
    assert leader is not None, f"{name} is not running"
    victims = [leader, *_descendants(leader), *processes.session_members(leader)]
    for pid in dict.fromkeys(victims):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(set(victims))


def now() -> datetime:
    return datetime.now(UTC)
