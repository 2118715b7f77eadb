"""`bench ui`: the MLflow UI over the store that `bench` runs log to.

Why not plain `mlflow ui`? It serves `./mlflow.db` of wherever it starts, not `$MLFLOW_TRACKING_URI`, and MLflow's
security middleware refuses a browser that reaches the server under any name but localhost (the Host check lets
private addresses through, but the Origin check then blocks the UI's POST requests, so its pages stay empty).
This starts `mlflow server` over `bench.runs.tracking`'s store (`$MLFLOW_TRACKING_URI`, else `./mlflow.db`), with new
experiments' artifacts beside it as `bench` puts them, and lets each address it prints through both checks.

Artifacts: `bench` creates each experiment with a plain local artifact location (the `mlartifacts`
folder beside the sqlite file), which the server reads directly; `--serve-artifacts` only proxies
`mlflow-artifacts:` URIs, so `--artifacts-destination` points at the same folder for those.
"""

import errno
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.cli.options import OneLineParser, int_in_range
from bench.core.errors import BenchError
from bench.runs.tracking import tracking_uri

STARTUP_TIMEOUT_S = 120


def run(argv: list[str]) -> None:
    parser = OneLineParser(prog="bench ui", description="Serve the MLflow UI over the store bench runs log to.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only); binding beyond loopback, "
                             "e.g. 0.0.0.0, must be asked for explicitly and exposes every run to the network")
    parser.add_argument("--port", type=int_in_range(1, 65535), default=5000, help="port (default 5000)")
    parser.add_argument("--workers", type=int_in_range(1, 64), default=1, help="server worker processes (default 1)")
    parser.add_argument("--hostname", action="append", default=[], metavar="NAME",
                        help="a name or address browsers use to reach the server when it is not --host "
                             "(e.g. with --host 0.0.0.0); repeatable; allowed by the Host and CORS checks")
    args = parser.parse_args(argv)

    # Ctrl-C or SIGTERM (even in the background, where the shell ignores SIGINT) only sets a flag that the loops
    # below read: a KeyboardInterrupt raised at whatever line was running can land in a finaliser (sqlalchemy's
    # weakref callbacks run during the imports below), where Python swallows it, and bench would wait for ever.
    stop_asked = threading.Event()
    handlers = [signal.signal(sig, lambda signum, frame: stop_asked.set()) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        serve(args, stop_asked)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def serve(args, stop_asked: threading.Event) -> None:
    """Start the server in its own process group (mlflow runs uvicorn and job runners under it), print its URLs
    once it answers, and stop the whole group when asked to or when bench ends."""
    check_port_free(args.host, args.port)  # before the store is made: a refused command leaves nothing
    command, urls = server_command(args.host, args.port, args.workers, args.hostname)
    if stop_asked.is_set():
        return
    # The server's own output goes to stderr (stdout carries the URLs), without the deprecation warnings of its
    # dependencies (starlette's is a UserWarning), which a user of bench cannot act on.
    quiet = "ignore::DeprecationWarning,ignore:starlette.middleware.wsgi is deprecated"
    server = subprocess.Popen(command, start_new_session=True, stdout=sys.stderr,
                              env={**os.environ, "PYTHONWARNINGS": quiet})
    up = False
    try:
        up = wait_until_up(server, urls[0], args.port, stop_asked)
        if up:
            latest = latest_comparison()  # its run page shows the table, its tests and figures
            lines = [f"MLflow UI: {url}" for url in urls] + ([f"latest comparison: {urls[0]}/#/{latest}"] if latest else [])
            print("\n".join(lines), flush=True)  # one write: whoever reads the URLs finds the comparison with them
        while up and not stop_asked.wait(0.5):
            if server.poll() is not None:
                if server.returncode != 0:
                    raise BenchError(f"the MLflow server exited with code {server.returncode}")
                return
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the server running
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop(server, graceful=up)


def latest_comparison() -> str | None:
    """The UI's path to the newest `bench compare` parent run (its table, tests and figures), else to the newest
    sweep's, else None. Read from the store the server serves."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    for role in ("tags.compare_role = 'parent'", "tags.sweep_role = 'study'"):
        runs = client.search_runs(experiments, role, order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
        if runs:
            return f"experiments/{runs[0].info.experiment_id}/runs/{runs[0].info.run_id}"
    return None


def server_command(host: str, port: int, workers: int, hostnames: list[str]) -> tuple[list[str], list[str]]:
    """The `mlflow server` command line and the URLs to print."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise BenchError(f"MLFLOW_TRACKING_URI is a tracking server ({uri}): open it in a browser instead")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", host, "--port", str(port), "--workers", str(workers)]
    if uri.startswith("sqlite:///"):
        artifacts = str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts")
        command += ["--default-artifact-root", artifacts, "--artifacts-destination", artifacts]
    names = ["127.0.0.1" if host in ("0.0.0.0", "::") else host, *hostnames]  # the first is polled: it must be local
    urls = [f"http://{f'[{n}]' if ':' in n else n}:{port}" for n in names]
    from mlflow.server.security_utils import get_default_allowed_hosts

    # The allowed hosts are always given: without them, mlflow recommends its own flags, which bench ui does not take.
    hosts = [f"[{n}]" if ":" in n else n for n in names if not default_allowed(n)]
    command += ["--allowed-hosts", ",".join([*get_default_allowed_hosts(), *hosts, *(f"{h}:{port}" for h in hosts)])]
    if hosts:
        command += ["--cors-allowed-origins", ",".join(f"http://{h}:{port}" for h in hosts)]
    return command, urls


def default_allowed(name: str) -> bool:
    """Whether MLflow's default Host and Origin checks accept a browser that uses this name: only loopback
    (a private address passes the Host check but not the Origin check of the UI's POST requests)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Bind the address as the server will, and name what is wrong with it: the port (in use, or reserved) or
    the host (not a name that resolves, or not an address of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError as err:
            reason = err.strerror or str(err)
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                raise BenchError(f"port {port} on {host} is not available ({reason}); "
                                 f"stop what uses it or pass --port") from err
            raise BenchError(f"--host {host} cannot be bound on this machine ({reason}); pass one of its "
                             f"addresses, 127.0.0.1 (the default) or 0.0.0.0") from err


def wait_until_up(server: subprocess.Popen, url: str, port: int, stop_asked: threading.Event) -> bool:
    """True once the server answers; False if asked to stop first."""
    # /health is exempt from the Host check, so this asks for the page itself, as a browser would.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and not stop_asked.is_set():
        if server.poll() is not None:
            raise BenchError(f"the MLflow server exited with code {server.returncode} before answering on port {port} "
                             f"(its log is above)")
        try:
            with opener.open(url + "/", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        stop_asked.wait(0.5)
    if stop_asked.is_set():
        return False
    raise BenchError(f"the MLflow server did not answer at {url} within {STARTUP_TIMEOUT_S} s")


def stop(server: subprocess.Popen, graceful: bool = True) -> None:
    """SIGTERM to the server's process group (mlflow and its uvicorn), then SIGKILL. Uvicorn shuts down
    gracefully on SIGTERM; SIGINT would make the mlflow process print a KeyboardInterrupt traceback from its
    threading shutdown, and a server still starting, one from wherever its imports were."""
    signals = ((signal.SIGTERM, 10 if graceful else 5), (signal.SIGKILL, 5))
    for sig, wait_s in signals:
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            server.poll()  # reap the leader, so that only live members keep the group
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
