"""Judging whether a recorded process is gone (locks, SFTP temporaries, btrfs snapshots,
libvirt run directories all ask storage/node.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from diskvault.storage import node


def test_a_process_is_gone_only_when_provably_so(monkeypatch):
    me = os.getpid()
    start = node.process_start(me)
    assert start is not None
    assert not node.process_gone(me, start) and not node.process_gone(me, None)
    assert node.process_gone(me, start + 1)  # the pid was reused by another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert node.process_gone(child.pid, None)  # reaped: no such pid
    # /proc mounted with hidepid: another user's live process has no /proc entry, but
    # kill(pid, 0) finds it — never judged gone (its file or snapshot would be removed)
    monkeypatch.setattr(node, "process_start", lambda pid: None)
    assert not node.process_gone(me, start)
