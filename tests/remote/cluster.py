"""A SeaweedFS cluster on 127.0.0.1: one master, several volume servers, a filer and an
S3 gateway, each its own process, every file stored twice (replication ``001``: a
second copy on another server of the same rack).

Started in dependency order, each step waiting for the last to be really ready (the
master leads, every volume server has registered, the filer answers, a signed S3
write and read go through), so no component sits out a reconnect back-off: the whole
cluster is up in a few seconds. Processes are the ``ServerProcess`` of
tests/storage/servers.py: own log, own ports, stopped by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.servers import LOCALHOST, SeaweedServer, ServerProcess, ServerStartError, free_port

WEED = shutil.which("weed") or "weed"


def _get_json(url: str) -> Any:
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=2) as r:
        return json.loads(r.read() or b"null")


class WeedProcess(ServerProcess):
    """One ``weed <component>``; ports are picked per process and re-picked on conflict."""

    grace = 1.0  # weed ignores SIGTERM; do not wait long before SIGKILL

    def __init__(self, base_dir: Path, name: str, ports: tuple[str, ...],
                 argv: Callable[[WeedProcess], list[str]],
                 probe: Callable[[WeedProcess], bool]) -> None:
        self.name = name
        self.port_names = ports
        self.ports: dict[str, int] = {}
        self._argv, self._probe = argv, probe
        super().__init__(base_dir)
        self.choose_ports()

    def choose_ports(self) -> None:
        self.ports = {p: free_port() for p in self.port_names}

    def argv(self) -> list[str]:
        return self._argv(self)

    def probe(self) -> bool:
        return self._probe(self)

    def _signal_all(self, sig: int, grace: float) -> None:
        super()._signal_all(sig, grace)
        for kind in ("master", "volume", "filer", "s3"):  # weed's unix sockets in /tmp
            for p in self.ports.values():
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{p}.sock")


class SeaweedCluster:
    def __init__(self, base: Path, volumes: int = 3, replication: str = "001",
                 bucket: str = "dv-cluster") -> None:
        self.base = base
        self.replication = replication
        self.bucket = bucket
        # the same credentials file and readiness probe as the one-process test server
        self._s3_like = SeaweedServer(base / "s3-identity", bucket=bucket)
        self.access_key, self.secret_key = self._s3_like.access_key, self._s3_like.secret_key
        self.master = WeedProcess(base / "master", "weed-master", ("http", "grpc"),
                                  self._master_argv, self._master_ready)
        self.volumes = [
            WeedProcess(base / f"volume{i}", f"weed-volume{i}", ("http", "grpc"),
                        self._volume_argv, lambda p: bool(_get_json(self._http(p) + "/status")))
            for i in range(volumes)]
        self.filer = WeedProcess(base / "filer", "weed-filer", ("http", "grpc"),
                                 self._filer_argv, lambda p: _get_json(self._http(p) + "/")
                                 is not None)
        self.s3 = WeedProcess(base / "s3", "weed-s3", ("http", "grpc"), self._s3_argv,
                              self._s3_ready)

    # --- command lines -----------------------------------------------------------------

    @staticmethod
    def _http(p: WeedProcess) -> str:
        return f"http://{LOCALHOST}:{p.ports['http']}"

    def _addr(self, p: WeedProcess) -> str:
        return f"{LOCALHOST}:{p.ports['http']}.{p.ports['grpc']}"

    def _common(self, p: WeedProcess) -> list[str]:
        return [f"-port={p.ports['http']}", f"-port.grpc={p.ports['grpc']}",
                f"-ip.bind={LOCALHOST}"]

    def _master_argv(self, p: WeedProcess) -> list[str]:
        return [WEED, "-logtostderr", "master", *self._common(p), f"-ip={LOCALHOST}",
                f"-mdir={p.dir}", f"-defaultReplication={self.replication}",
                "-volumeSizeLimitMB=64", "-electionTimeout=1s", "-telemetry=false"]

    def _volume_argv(self, p: WeedProcess) -> list[str]:
        return [WEED, "-logtostderr", "volume", *self._common(p), f"-ip={LOCALHOST}",
                f"-dir={p.dir}", "-max=32", f"-master={self._addr(self.master)}",
                "-preStopSeconds=0", "-minFreeSpace=1GiB"]

    def _filer_argv(self, p: WeedProcess) -> list[str]:
        return [WEED, "-logtostderr", "filer", *self._common(p), f"-ip={LOCALHOST}",
                f"-master={self._addr(self.master)}", f"-defaultStoreDir={p.dir}",
                f"-defaultReplicaPlacement={self.replication}",
                f"-localSocket={p.dir}/filer.sock"]

    def _s3_argv(self, p: WeedProcess) -> list[str]:
        return [WEED, "-logtostderr", "s3", *self._common(p), f"-ip={LOCALHOST}",
                f"-filer={self._addr(self.filer)}", f"-config={self._s3_like.config_path}",
                f"-localSocket={p.dir}/s3.sock", "-port.iceberg=0", "-port.lance=0"]

    # --- readiness -----------------------------------------------------------------------

    def _master_ready(self, p: WeedProcess) -> bool:
        return bool(_get_json(self._http(p) + "/cluster/status").get("IsLeader"))

    def data_nodes(self) -> list[dict]:
        topo = _get_json(self._http(self.master) + "/dir/status")["Topology"]
        return [n for dc in topo.get("DataCenters") or [] for rack in dc.get("Racks") or []
                for n in rack.get("DataNodes") or []]

    def _s3_ready(self, p: WeedProcess) -> bool:
        self._s3_like.ports = {"s3": p.ports["http"]}
        self._s3_like._client = None
        return self._s3_like.probe()

    # --- life cycle ----------------------------------------------------------------------

    @property
    def processes(self) -> list[WeedProcess]:
        return [self.master, *self.volumes, self.filer, self.s3]

    def start(self) -> None:
        self.master.start_fresh()
        for v in self.volumes:
            v.start_fresh()
        deadline = time.monotonic() + 30
        while len(self.data_nodes()) < len(self.volumes):
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"only {len(self.data_nodes())} of {len(self.volumes)} volume servers "
                    f"registered; log {self.master.log_path}:\n{self.master.log_tail()}")
            time.sleep(0.1)
        self.filer.start_fresh()
        self.s3.start_fresh()

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()

    @property
    def endpoint(self) -> str:
        return self._http(self.s3)

    def url(self, path: str) -> str:
        return f"s3:{self.access_key}:{self.secret_key}@{self.endpoint}/{self.bucket}/{path}"

    def client(self) -> Any:
        return self._s3_like.client()

    def volumes_of(self) -> dict[str, set[int]]:
        """Volume server address → ids of the volumes it holds (as the master sees it)."""
        out: dict[str, set[int]] = {}
        for node in self.data_nodes():
            ids: set[int] = set()
            for tok in str(node.get("VolumeIds", "")).split():  # " 1 3-6"
                lo, _, hi = tok.partition("-")
                ids.update(range(int(lo), int(hi or lo) + 1))
            out[node["Url"]] = ids
        return out

    def volume_server(self, address: str) -> WeedProcess:
        return next(v for v in self.volumes if address.endswith(f":{v.ports['http']}"))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail(15)}" for p in self.processes)
