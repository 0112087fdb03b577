"""source/libvirt.py in-process, with a stand-in for virsh: what the real daemon
cannot easily show in a test (a stopped persistent domain would need a definition
written under /etc)."""

from __future__ import annotations

import pytest

from diskvault.errors import VmError
from diskvault.source.libvirt import LibvirtError, LibvirtVm, Virsh


class FakeVirsh(Virsh):
    def __init__(self, answers: dict[str, str]) -> None:
        self.uri, self.answers, self.calls = None, answers, []

    def __call__(self, *args: str, quiet: bool = True) -> str:
        self.calls.append(args)
        if args[0] not in self.answers:
            raise LibvirtError(f"libvirt: no answer for {args[0]}")
        return self.answers[args[0]]


@pytest.mark.parametrize("state", ["shut off", "crashed", "pmsuspended"])
def test_a_domain_that_is_not_running_is_refused(state):
    with pytest.raises(VmError, match=f"domain vm1 is not running \\({state}\\)"):
        LibvirtVm(FakeVirsh({"domstate": state + "\n"}), "vm1")


def test_someone_elses_backup_job_is_not_aborted(tmp_path):
    v = FakeVirsh({"domstate": "running\n", "backup-dumpxml":
                   "<domainbackup mode='pull'><server transport='unix' "
                   "socket='/run/other/backup.sock'/></domainbackup>"})
    with pytest.raises(VmError, match="not diskvault's"):
        LibvirtVm(v, "vm1").remove_leftovers("uuid:x")
    assert not any(c[0] == "domjobabort" for c in v.calls)
