"""A libvirt QEMU driver daemon that tests start themselves, and test domains.

The daemon runs in **session mode**: ``libvirtd`` (or ``virtqemud`` where the
distribution ships the modular daemons) started by the test as an unprivileged user
(``nobody``, via ``setpriv``) with HOME and the XDG directories in a temporary
directory, so it reads and writes nothing outside it — no /etc edits, no system
daemon. (As root, libvirt always runs privileged, and then wants the ``libvirt-qemu``
user and /etc/libvirt/qemu.conf, which a test must not change.) diskvault and the tests
connect as root with ``qemu+unix:///session?socket=…``. QEMU then runs as ``nobody``,
as it runs as ``libvirt-qemu`` under qemu:///system: diskvault must hand it its run
directory, which these tests check on the way.

Domains are transient (``virsh create``), TCG, no network, no graphics; paused ones run
no guest code — QEMU's block layer serves the disks, and writes go through HMP
``qemu-io`` on the guest device's backend, the same path and the same dirty bitmaps as
a guest's writes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from xml.sax.saxutils import escape

import pytest

DAEMONS = ("virtqemud", "libvirtd")
USER = 65534  # nobody


def _daemon() -> str | None:
    return next((d for d in DAEMONS if shutil.which(d)), None)


def libvirt_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (the test runs its own libvirt daemon as another user)"
    if _daemon() is None:
        return "needs virtqemud or libvirtd (Debian: libvirt-daemon)"
    for tool, pkg in (("virsh", "libvirt-clients"), ("qemu-system-x86_64", "qemu-system-x86"),
                      ("qemu-img", "qemu-utils"), ("setpriv", "util-linux"),
                      ("qemu-storage-daemon", "qemu-system-common"),
                      ("nbdinfo", "libnbd-bin"), ("fusermount3", "fuse3")):
        if not shutil.which(tool):
            return f"needs {tool} (Debian: {pkg})"
    return None


needs_libvirt = pytest.mark.skipif(libvirt_missing() is not None,
                                   reason=libvirt_missing() or "")


class Libvirt:
    """A running session daemon; ``virsh(...)`` talks to it; ``workdir()`` gives a
    directory its QEMU (user ``nobody``) can use for images, consoles, sockets."""

    def __init__(self) -> None:
        # not under pytest's tmp_path: its parents are root's alone
        self.dir = tempfile.mkdtemp(prefix="diskvault-libvirt-")
        os.chmod(self.dir, 0o755)
        run = os.path.join(self.dir, "run")
        os.mkdir(run, 0o700)
        for d in (self.dir, run):
            os.chown(d, USER, USER)
        daemon = _daemon() or DAEMONS[0]
        sock = "virtqemud-sock" if daemon == "virtqemud" else "libvirt-sock"
        self.uri = f"qemu+unix:///session?socket={run}/libvirt/{sock}"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.dir,
               "XDG_RUNTIME_DIR": run, "XDG_CONFIG_HOME": os.path.join(self.dir, "config"),
               "XDG_CACHE_HOME": os.path.join(self.dir, "cache")}
        self.log = open(os.path.join(self.dir, "daemon.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", daemon],
            env=env, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while self.virsh("version", check=False).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(os.path.join(self.dir, "daemon.log")) as f:
                    raise RuntimeError(f"{daemon} did not start: {f.read()[-2000:]}")
            time.sleep(0.1)

    def workdir(self) -> str:
        d = tempfile.mkdtemp(dir=self.dir)
        os.chown(d, USER, USER)
        return d

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                           text=True, timeout=300)
        if check and r.returncode:
            raise AssertionError(f"virsh {' '.join(args)}: {r.stderr.strip()}")
        return r

    def stop(self) -> None:
        if self.proc.poll() is None:
            for dom in self.virsh("list", "--name", check=False).stdout.split():
                self.virsh("destroy", dom, check=False)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def libvirt() -> Iterator[Libvirt]:
    lv = Libvirt()
    try:
        yield lv
    finally:
        lv.stop()


def domain_xml(name: str, disks: dict[str, str], boot: tuple[str, str] | None = None,
               console: str | None = None, agent: str | None = None) -> str:
    """``boot``: (kernel, initrd) to run a guest (else it sits paused, no firmware runs);
    ``console``: the serial port's log file; ``agent``: the guest agent channel's socket."""
    devs = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{escape(path)}'/><target dev='{dev}' bus='virtio'/></disk>"
        for dev, path in disks.items())
    devs += (f"<serial type='file'><source path='{escape(console)}'/><target port='0'/>"
             "</serial>" if console else "<serial type='null'/>")
    if agent:
        devs += (f"<channel type='unix'><source mode='bind' path='{escape(agent)}'/>"
                 "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>")
    os_ = "<type arch='x86_64' machine='pc'>hvm</type>"
    if boot:
        os_ += (f"<kernel>{escape(boot[0])}</kernel><initrd>{escape(boot[1])}</initrd>"
                "<cmdline>console=ttyS0 panic=-1 quiet</cmdline>")
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid.uuid4()}</uuid>"
            "<memory unit='MiB'>256</memory><vcpu>1</vcpu>"
            f"<os>{os_}</os><cpu mode='maximum'/><on_poweroff>destroy</on_poweroff>"
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
            f"{devs}<controller type='usb' model='none'/><memballoon model='none'/>"
            "</devices></domain>")


class Domain:
    """A transient domain with qcow2 disks ``{target: path}``: paused, or booting
    ``boot`` = (kernel, initrd) with its console in ``console``."""

    def __init__(self, lv: Libvirt, workdir: str, disks: dict[str, str],
                 boot: tuple[str, str] | None = None) -> None:
        self.lv, self.name = lv, f"dv-{uuid.uuid4().hex[:8]}"
        for path in [*disks.values(), *(boot or ())]:
            os.chown(path, USER, USER)  # QEMU runs as the session's user
        self.console = os.path.join(workdir, f"{self.name}.console") if boot else None
        xml = os.path.join(workdir, f"{self.name}.xml")
        with open(xml, "w") as f:
            f.write(domain_xml(self.name, disks, boot, self.console,
                               os.path.join(workdir, f"{self.name}.qga") if boot else None))
        lv.virsh("create", xml, *([] if boot else ["--paused"]))
        self.aliases: dict[str, str] = {}  # target → device alias (qdev id)
        root = ET.fromstring(lv.virsh("dumpxml", self.name).stdout)
        for d in root.iterfind("devices/disk"):
            target, alias = d.find("target"), d.find("alias")
            if target is not None and alias is not None:
                self.aliases[target.get("dev", "")] = alias.get("name", "")

    def qemu_io(self, dev: str, cmd: str) -> None:
        path = f"/machine/peripheral/{self.aliases[dev]}/virtio-backend"
        out = self.lv.virsh("qemu-monitor-command", self.name, "--hmp",
                            f'qemu-io -d {path} "{cmd}"').stdout
        assert "error" not in out.lower(), out

    @property
    def vm_key(self) -> str:
        """The key diskvault gives this VM (source/libvirt.py ``identity``)."""
        return "uuid:" + self.lv.virsh("domuuid", self.name).stdout.strip()

    def checkpoints(self) -> list[str]:
        return self.lv.virsh("checkpoint-list", self.name, "--name").stdout.split()

    def backup_job(self) -> bool:
        return self.lv.virsh("backup-dumpxml", self.name, check=False).returncode == 0

    def destroy(self) -> None:
        self.lv.virsh("destroy", self.name, check=False)
