"""Service processes for `clisonix up` and `clisonix demo`: start each service as `python -m services.<name>`
in one process group, wait until its gRPC health says SERVING, stop them in reverse order.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Default ports (ARCHITECTURE.md): gRPC and metrics per service.
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "ingest": (50051, 9101),
    "fusion": (50052, 9102),
    "inference": (8001, 9103),
    # One Tide replica (no snapshot file by default: it replays the command log on start).
    "tide": (50054, 9104),
    "liam": (50055, 9105),
}
SERVICES = tuple(DEFAULT_PORTS)
# The shipped model repository: the inference service is started with its absolute path, so the services find
# it whatever their working directory.
MODEL_REPOSITORY = Path(__file__).resolve().parents[1] / "models"


def wait_serving(target: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Waits until the gRPC health service at `target` answers SERVING; raises TimeoutError or RuntimeError."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"service at {target} exited with code {process.returncode} while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"service at {target} was not SERVING within {timeout_s} s")


@dataclass
class ServiceProcess:
    """One service running as a child process."""

    name: str
    grpc_port: int
    metrics_port: int
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 60.0) -> ServiceProcess:
        output = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env={
                **os.environ,
                **self.env,
                "CLISONIX_GRPC_PORT": str(self.grpc_port),
                "CLISONIX_METRICS_PORT": str(self.metrics_port),
            },
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
        )
        if output is not None:
            output.close()
        wait_serving(self.target, timeout_s, self.process)
        return self

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (the service drains), then SIGKILL after `timeout_s`; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def local_environment(bootstrap_servers: str) -> dict[str, str]:
    """Environment for services on one machine: the given broker, a short fetch wait, text logs, the
    repository's models (unless CLISONIX_MODEL_REPOSITORY names others).

    Without CLISONIX_PSEUDONYM_KEY a random key is made for this run only: pseudonyms then differ between
    runs, which is safe for a demo and wrong for a study (set the key for real data).
    """
    env = {
        "CLISONIX_KAFKA_BOOTSTRAP_SERVERS": bootstrap_servers,
        "CLISONIX_LOG_FORMAT": os.environ.get("CLISONIX_LOG_FORMAT", "text"),
        # One machine: listen on loopback only unless told otherwise.
        "CLISONIX_GRPC_HOST": os.environ.get("CLISONIX_GRPC_HOST", "127.0.0.1"),
        "CLISONIX_METRICS_HOST": os.environ.get("CLISONIX_METRICS_HOST", "127.0.0.1"),
        "CLISONIX_MODEL_REPOSITORY": os.environ.get("CLISONIX_MODEL_REPOSITORY", str(MODEL_REPOSITORY)),
    }
    if not os.environ.get("CLISONIX_PSEUDONYM_KEY"):
        env["CLISONIX_PSEUDONYM_KEY"] = secrets.token_hex(32)
    return env
