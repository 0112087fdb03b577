"""Borg users' SSH habits against the real sshd: ssh:// locations, --rsh/DISKVAULT_RSH."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from remote.conftest import file_sha, random_file, restored_sha
from support import dv, init_repo

from diskvault.errors import UsageError
from diskvault.storage.rsh import parse_rsh


def test_ssh_url_is_an_alias_of_sftp(sftp_server, tmp_path: Path) -> None:
    sftp_server.configure_client(Path(os.environ["HOME"]))
    repo = tmp_path / "repo"
    url = f"ssh://{sftp_server.user}@127.0.0.1:{sftp_server.port}{repo}"
    init_repo(url, "repokey")
    data = random_file(tmp_path / "data.bin", 1 << 20, seed=4)
    dv("create", f"{url}::a", str(data))
    assert (repo / "config").exists()  # the same repository, as a plain path on the host
    assert restored_sha(f"{url}::a") == file_sha(data)
    assert restored_sha(f"{sftp_server.url(str(repo))}::a") == file_sha(data)


def test_rsh_options_reach_the_connection(sftp_server, tmp_path: Path) -> None:
    """No ~/.ssh at all: key, port and known-hosts file come from --rsh / DISKVAULT_RSH."""
    known = tmp_path / "known"
    known.write_text(sftp_server.host_key_line())
    rsh = (f"ssh -i {sftp_server.user_key} -p {sftp_server.port} "
           f"-o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes")
    repo = tmp_path / "repo"
    url = f"ssh://{sftp_server.user}@127.0.0.1{repo}"  # no port in the URL: -p gives it
    # without the options: no key, wrong port — refused, nothing created
    r = dv("init", "-e", "none", url, check=False, env={"DISKVAULT_RETRY_SECONDS": "0"})
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert not repo.exists()
    dv("init", "-e", "none", "--rsh", rsh, url)
    data = random_file(tmp_path / "data.bin", 1 << 20, seed=5)
    dv("create", "--rsh", rsh, f"{url}::a", str(data))
    out = dv("extract", "--stdout", f"{url}::a", env={"DISKVAULT_RSH": rsh}).stdout
    assert out == data.read_bytes()
    # StrictHostKeyChecking=yes and an empty known-hosts file: the host is unknown
    strict = rsh.replace(f"UserKnownHostsFile={known}", "UserKnownHostsFile=/dev/null")
    r = dv("list", "--rsh", strict, url, check=False)
    assert r.returncode == 2 and b"host key of 127.0.0.1 is unknown" in r.stderr, r.stderr
    # accept-new trusts it and records it in the first known-hosts file
    fresh = tmp_path / "fresh"
    accept = (strict.replace("UserKnownHostsFile=/dev/null", f"UserKnownHostsFile={fresh}")
              .replace("StrictHostKeyChecking=yes", "StrictHostKeyChecking=accept-new"))
    assert dv("list", "--short", "--rsh", accept, url).stdout == b"a\n"
    assert fresh.read_text().split()[1:] == sftp_server.host_key_line().split()[1:]


@pytest.mark.parametrize(("rsh", "message"), [
    ("ssh -C", "the ssh option '-C' cannot be honoured"),
    ("ssh -o ProxyJump=gw", "the ssh option '-o' cannot be honoured"),
    ("ssh -o Compression=yes", "cannot be honoured"),
    ("ssh -p", "-p needs a value"),
    ("ssh -p 99999", "bad port '99999'"),
    ("rsync -e ssh", "must be an ssh command line"),
    ("ssh 'unterminated", "cannot parse"),
])
def test_rsh_refuses_what_it_cannot_honour(rsh: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=message):
        parse_rsh(rsh)
    r = dv("init", "-e", "none", "--rsh", rsh, f"ssh://u@127.0.0.1:9{tmp_path}/r", check=False)
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1
    assert message in r.stderr.decode()


def test_rsh_parsing() -> None:
    assert parse_rsh("") == {}
    assert parse_rsh("/usr/bin/ssh -i ~/k1 -ik2 -p 2222 -l bob -o 'User alice' "
                     "-o StrictHostKeyChecking=Accept-New -oProxyCommand='nc %h %p'") == {
        "identityfile": [os.path.expanduser("~/k1"), "k2"], "port": "2222", "user": "alice",
        "stricthostkeychecking": "accept-new", "proxycommand": "nc %h %p"}


def test_ssh_url_forms() -> None:
    from diskvault.storage.url import mask, open_store

    def target(location: str) -> tuple:
        s = open_store(location, retry=False)
        return s.host, s.user, s.port, s.path  # type: ignore[attr-defined]

    assert target("ssh://bob@nas:2222/srv/repo") == ("nas", "bob", 2222, "/srv/repo")
    assert target("ssh://nas/./repo") == ("nas", None, None, "repo")  # Borg: relative
    assert target("ssh://nas/~/repo") == ("nas", None, None, "repo")
    assert target("ssh://[::1]:22/r") == ("::1", None, 22, "/r")
    assert mask("ssh://bob:pw@nas/r") == "ssh://bob:***@nas/r"
    for bad in ("ssh://nas", "ssh://nas/./", "ssh:/nas/r"):
        with pytest.raises(UsageError, match="cannot understand repository location"):
            open_store(bad)
