"""Running PostgreSQL server programs on this host (pg_ctl, pg_basebackup).

Used by ``tools/devcluster`` and by ``shardctl node rejoin``, which runs on the host of
the node it rebuilds.  Debian keeps the server programs off the PATH, in
``/usr/lib/postgresql/<version>/bin``; the newest version there wins.  Postgres refuses
to run as root, so as root every program runs as the owner of the data directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

# Settings that say which primary a standby follows: rebuilt on every rejoin.
_STANDBY_KEYS = ("primary_conninfo", "primary_slot_name", "synchronous_standby_names")
# The node's own files, kept across a rebuild (a base backup brings the source's).
_OWN_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf")


class PgCtlError(RuntimeError):
    pass


def bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb, else initdb's on PATH."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(re.findall(r"/(\d+)/bin", p)[0]), reverse=True)
    if found:
        return Path(found[0]).parent
    which = shutil.which("initdb")
    return Path(which).resolve().parent if which else None


def program(name: str) -> str:
    directory = bindir()
    if directory is None:
        raise PgCtlError("PostgreSQL server programs not found (apt-get install postgresql)")
    return str(directory / name)


def as_user(cmd: list[str], user: str) -> list[str]:
    """``cmd`` run as ``user`` (via runuser when we are root)."""
    if os.geteuid() == 0 and user != "root":
        return ["runuser", "-u", user, "--", *cmd]
    return cmd


def run(cmd: list[str], *, user: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(as_user(cmd, user), capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise PgCtlError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result


def owner(path: str | Path) -> str:
    return pwd.getpwuid(os.stat(path).st_uid).pw_name


def alive(pid: int) -> bool:
    """True when the process runs (a zombie awaiting its parent does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def postmaster_pid(datadir: str | Path) -> int | None:
    """The running postmaster of ``datadir``, or None (a SIGKILLed one leaves its pidfile)."""
    try:
        pid = int((Path(datadir) / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def start(datadir: str | Path, *, logfile: str | Path, user: str) -> None:
    run(
        [program("pg_ctl"), "-D", str(datadir), "-l", str(logfile), "-w", "-t", "60", "start"],
        user=user,
    )


def stop(datadir: str | Path, *, user: str, mode: str = "fast") -> None:
    """Stop the server (``mode`` as pg_ctl's: fast, or immediate for one whose data is
    thrown away next)."""
    if postmaster_pid(datadir) is not None:
        run(
            [program("pg_ctl"), "-D", str(datadir), "-m", mode, "-w", "-t", "60", "stop"],
            user=user,
        )


def _settings(text: str, *, drop: tuple[str, ...]) -> list[str]:
    keep = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip().lower()
        if key not in drop:
            keep.append(line)
    return keep


def rebuild_standby(
    datadir: str,
    *,
    source_host: str,
    source_port: int,
    user: str,
    slot: str,
    application_name: str,
    logfile: str | None = None,
) -> None:
    """Replace a stopped-or-running node's data with a base backup of ``source``; start it.

    The node's own configuration (postgresql.conf, pg_hba.conf, and its
    postgresql.auto.conf without the standby settings) survives; the standby settings
    come from ``pg_basebackup -R``.  The old directory is removed only after the backup
    succeeded, so a failed rebuild leaves the node as it was (stopped).
    """
    data = Path(datadir)
    os_user = owner(data)
    stop(data, user=os_user)
    own = {name: (data / name).read_text() for name in _OWN_FILES if (data / name).exists()}
    own_auto = (
        (data / "postgresql.auto.conf").read_text()
        if (data / "postgresql.auto.conf").exists()
        else ""
    )
    aside = data.with_name(data.name + ".rejoin-old")
    if aside.exists():
        shutil.rmtree(aside)
    data.rename(aside)
    data.mkdir(mode=0o700)
    shutil.copystat(aside, data)
    os.chown(data, os.stat(aside).st_uid, os.stat(aside).st_gid)
    conninfo = (
        f"host={source_host} port={source_port} user={user} application_name={application_name}"
    )
    try:
        run(
            [
                program("pg_basebackup"),
                "-d",
                conninfo,
                "-D",
                str(data),
                "-R",
                "-X",
                "stream",
                "-C",
                "-S",
                slot,
                "--no-sync",
                "--checkpoint=fast",
            ],
            user=os_user,
        )
    except PgCtlError:
        shutil.rmtree(data, ignore_errors=True)
        aside.rename(data)
        raise
    backup_auto = (data / "postgresql.auto.conf").read_text()
    standby = [
        line
        for line in backup_auto.splitlines()
        if line.split("=", 1)[0].strip().lower() in ("primary_conninfo", "primary_slot_name")
    ][-2:]
    for name, text in own.items():
        (data / name).write_text(text)
    auto = _settings(own_auto, drop=_STANDBY_KEYS) + standby
    (data / "postgresql.auto.conf").write_text("\n".join(auto) + "\n")
    for name in (*own, "postgresql.auto.conf"):
        os.chown(data / name, os.stat(data).st_uid, os.stat(data).st_gid)
    shutil.rmtree(aside)
    start(data, logfile=logfile or f"{data}.log", user=os_user)
