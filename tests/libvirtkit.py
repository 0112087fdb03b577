"""A libvirt QEMU driver daemon that tests start themselves, and paused test domains.

The daemon is ``virtqemud`` (libvirt's modular QEMU daemon) or, where the distribution
ships only the monolithic one, ``libvirtd``, started by the test as root with its own
configuration file, whose only change is the socket directory: a temporary one, so
the test connects with ``qemu+unix:///system?socket=…`` and nothing in /etc is
edited. Domains are transient (``virsh create``: no configuration file is
written), TCG, no network, no graphics, started paused: no guest code runs, QEMU's
block layer serves the disks, and writes go through HMP ``qemu-io`` on the guest
device's backend — the same path and the same dirty bitmaps as a guest's writes. The
domain's DAC label is root's, so QEMU reads the test's images where they are.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from xml.sax.saxutils import escape

import pytest

# (daemon, its socket's name in unix_sock_dir)
DAEMONS = (("virtqemud", "virtqemud-sock"), ("libvirtd", "libvirt-sock"))


def _daemon() -> tuple[str, str] | None:
    return next((d for d in DAEMONS if shutil.which(d[0])), None)


def libvirt_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (the test runs its own libvirt daemon)"
    if _daemon() is None:
        return "needs virtqemud or libvirtd (Debian: libvirt-daemon)"
    for tool, pkg in (("virsh", "libvirt-clients"), ("qemu-system-x86_64", "qemu-system-x86"),
                      ("qemu-img", "qemu-utils"),
                      ("qemu-storage-daemon", "qemu-system-common"),
                      ("nbdinfo", "libnbd-bin"), ("fusermount3", "fuse3")):
        if not shutil.which(tool):
            return f"needs {tool} (Debian: {pkg})"
    return None


needs_libvirt = pytest.mark.skipif(libvirt_missing() is not None,
                                   reason=libvirt_missing() or "")


class Libvirt:
    """A running daemon; ``virsh(...)`` talks to it."""

    def __init__(self, workdir: str) -> None:
        self.dir = workdir
        daemon, sock = _daemon() or DAEMONS[0]
        conf = os.path.join(workdir, f"{daemon}.conf")
        with open(conf, "w") as f:
            f.write(f'unix_sock_dir = "{workdir}"\n')
        self.uri = f"qemu+unix:///system?socket={workdir}/{sock}"
        self.log = open(os.path.join(workdir, "daemon.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([daemon, "-f", conf, "-p", os.path.join(workdir, "pid")],
                                     stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while self.virsh("version", check=False).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(os.path.join(workdir, "daemon.log")) as f:
                    raise RuntimeError(f"{daemon} did not start: {f.read()[-2000:]}")
            time.sleep(0.1)

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


@pytest.fixture(scope="module")
def libvirt(tmp_path_factory) -> Iterator[Libvirt]:
    lv = Libvirt(str(tmp_path_factory.mktemp("libvirt")))
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
            "</devices>"
            "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label>"
            "</seclabel></domain>")


class Domain:
    """A transient domain with qcow2 disks ``{target: path}``: paused, or booting
    ``boot`` = (kernel, initrd) with its console in ``console``."""

    def __init__(self, lv: Libvirt, workdir: str, disks: dict[str, str],
                 boot: tuple[str, str] | None = None) -> None:
        self.lv, self.name = lv, f"dv-{uuid.uuid4().hex[:8]}"
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

    def checkpoints(self) -> list[str]:
        return self.lv.virsh("checkpoint-list", self.name, "--name").stdout.split()

    def backup_job(self) -> bool:
        return self.lv.virsh("backup-dumpxml", self.name, check=False).returncode == 0

    def destroy(self) -> None:
        self.lv.virsh("destroy", self.name, check=False)
