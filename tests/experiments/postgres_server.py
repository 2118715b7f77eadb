"""A throwaway PostgreSQL server for tests.

Optuna's RDB storage is shared by several worker processes only through a real
database server (SQLite locks up under concurrent writers), so tests that
exercise that path start their own PostgreSQL: a fresh cluster in a temporary
directory, reachable on a free loopback port with trust auth, stopped and
deleted afterwards.  Nothing on the machine is touched, and no running
PostgreSQL service is needed, only its binaries (Debian: `apt-get install
postgresql`; .ci/run does that).

PostgreSQL refuses to run as root.  When the tests run as root (CI does), the
server runs as the unprivileged `postgres` user that the Debian package
creates (or `nobody` where there is none), and the temporary directory is
handed over to that user, so its parent directories must be world-traversable
(they are under /tmp).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

DB_USER = "postgres"
DB_NAME = "bench"

# Durability is pointless for a throwaway cluster; these make startup and
# Optuna's many small commits fast.
_SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "50",
    "shared_buffers": "16MB",
}


def find_postgres_bindir() -> Path:
    """The directory holding initdb and pg_ctl: Debian's newest, else PATH."""
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if debian:
        return Path(debian[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl", path=str(Path(initdb).parent)):
        return Path(initdb).resolve().parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in "
        "/usr/lib/postgresql/*/bin or on PATH: install them with "
        "`apt-get install postgresql` (Debian/Ubuntu)."
    )


def _server_account() -> pwd.struct_passwd | None:
    """The user to run the server as, or None to run as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, but no 'postgres' or 'nobody' user to run PostgreSQL as")


def _check_traversable(directory: Path) -> None:
    """Fail clearly if another user cannot reach `directory` (e.g. TMPDIR under /root)."""
    for parent in directory.resolve().parents:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            raise RuntimeError(
                f"{parent} is not world-traversable, so the unprivileged PostgreSQL "
                f"user cannot reach {directory}; point TMPDIR elsewhere (e.g. /tmp)"
            )


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """Start a fresh PostgreSQL server; yield its SQLAlchemy URL; stop and delete it.

    The URL is ``postgresql+psycopg2://postgres@127.0.0.1:PORT/bench`` (trust
    auth, no password).  Raises RuntimeError if PostgreSQL is not installed or
    the server does not start (the message then includes the server log).
    """
    bindir = find_postgres_bindir()
    account = _server_account()
    as_account: dict = {}
    if account is not None:
        as_account = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[])

    root = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    data, log = root / "data", root / "server.log"

    def run(*args: str | Path, as_server: bool = True) -> None:
        result = subprocess.run(
            [str(a) for a in args],
            cwd=root,  # the server user may not be able to enter our cwd
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            **(as_account if as_server else {}),
        )
        if result.returncode != 0:
            server_log = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{server_log}"
            )

    started = failed = False
    try:
        if account is not None:
            _check_traversable(root)
            os.chown(root, account.pw_uid, account.pw_gid)
        # C locale: independent of which locales the machine has generated.
        run(bindir / "initdb", "-D", data, "-U", DB_USER, "--auth=trust",
            "--locale=C", "--encoding=UTF8", "--no-sync", "--no-instructions")
        port = _free_loopback_port()
        settings = {**_SERVER_SETTINGS, "port": str(port), "unix_socket_directories": f"'{root}'"}
        with open(data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        started = True  # from here on, always try to stop it
        run(bindir / "pg_ctl", "start", "-D", data, "-l", log, "-w", "-t", "60")
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, DB_NAME,
            as_server=False)
        yield f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{port}/{DB_NAME}"
    except BaseException:
        failed = True
        raise
    finally:
        try:
            if started:
                run(bindir / "pg_ctl", "stop", "-D", data, "-m", "immediate", "-w")
        except RuntimeError:
            if not failed:  # don't hide the error that got us here
                raise
        finally:
            shutil.rmtree(root, ignore_errors=True)
