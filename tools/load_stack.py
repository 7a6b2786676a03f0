"""The tracking stack `make load-test` loads, all on loopback: PostgreSQL in a temporary directory, the chart's
MLflow server process on it (`mlflow server --workers 2 --serve-artifacts`, the deployment's arguments, with
psycopg2 as the MLflow image installs it), and a TCP proxy that delays requests.

The proxy is ours (a few lines of asyncio) because nothing installed here injects latency on loopback without
root: tc/netem needs CAP_NET_ADMIN and a qdisc on lo for every process, toxiproxy is not packaged."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DB_PASSWORD = "load-test-db-pw"
# Where `make load-test-deps` puts psycopg2-binary (the MLflow image's driver, pinned by its lock) when the dev
# venv lacks it: only the server process gets it on its path.
DRIVER_SITE = ROOT / ".load-test" / "site"
CHART_WORKERS = 2  # charts/values.yaml mlflow.workers


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_bin(name: str) -> str:
    hits = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if hits:
        return str(hits[-1])
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"PostgreSQL's {name} is not installed (apt-get install postgresql): the load test needs it")
    return found


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a database and role ``mlflow`` (password auth over TCP,
    as the chart's external-database secret gives MLflow)."""

    def __init__(self, work: Path) -> None:
        self.data, self.sock = work / "pgdata", work / "pgsock"
        self.port = free_port()
        self.as_user: list[str] = []
        self.superuser = getpass.getuser()
        self.uri = f"postgresql+psycopg2://mlflow:{DB_PASSWORD}@127.0.0.1:{self.port}/mlflow"

    def start(self) -> Postgres:
        self.data.mkdir(parents=True)
        self.sock.mkdir(parents=True)
        if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
            for d in (self.data, self.sock):
                shutil.chown(d, "postgres", "postgres")
            for d in (self.data.parent, self.data.parent.parent):  # mkdtemp's 0700 would keep it out
                d.chmod(0o711)
            self.as_user, self.superuser = ["runuser", "-u", "postgres", "--"], "postgres"
        subprocess.run([*self.as_user, pg_bin("initdb"), "-D", str(self.data), "-U", self.superuser,
                        "--auth-local=trust", "--auth-host=scram-sha-256"], check=True, capture_output=True)
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.sock} "
                "-c max_connections=200 -c fsync=on")
        subprocess.run([*self.as_user, pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.sock / "pg.log"), "-w",
                        "-o", opts, "start"], check=True, capture_output=True)
        self.psql(f"CREATE ROLE mlflow LOGIN PASSWORD '{DB_PASSWORD}'", db="postgres", admin=True)
        self.psql("CREATE DATABASE mlflow OWNER mlflow", db="postgres", admin=True)
        return self

    def psql(self, sql: str, db: str = "mlflow", admin: bool = False) -> str:
        """Rows of ``sql`` as ``a|b|c`` lines (as MLflow's role over TCP unless ``admin``)."""
        if admin:
            cmd = [*self.as_user, pg_bin("psql"), "-h", str(self.sock), "-p", str(self.port), "-U", self.superuser]
        else:
            cmd = [pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow"]
        proc = subprocess.run([*cmd, "-v", "ON_ERROR_STOP=1", "-d", db, "-tAc", sql], capture_output=True, text=True,
                              env={**os.environ, "PGPASSWORD": DB_PASSWORD}, check=True)
        return proc.stdout.strip()

    def version(self) -> str:
        return self.psql("SHOW server_version")

    def stop(self) -> None:
        subprocess.run([*self.as_user, pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"],
                       capture_output=True)


class MlflowServer:
    """`mlflow server` as the chart's Deployment runs it, on a fixed port, which can be killed and restarted."""

    def __init__(self, store_uri: str, artifacts: Path, log: Path, workers: int = CHART_WORKERS) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store_uri, self.artifacts, self.log, self.workers = store_uri, artifacts, log, workers
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> float:
        """Start it and wait for /health; returns the seconds that took."""
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": self.store_uri}
        if DRIVER_SITE.is_dir():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(DRIVER_SITE), env.get("PYTHONPATH")) if p)
        t0 = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                 f"--port={self.port}", f"--workers={self.workers}", "--serve-artifacts",
                 f"--artifacts-destination={self.artifacts}"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                self.kill()
                raise RuntimeError(f"mlflow server did not start; see {self.log}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL to the server and its workers: a crash (an OOM kill, a node lost), not a graceful stop."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None


class LatencyProxy:
    """A loopback TCP proxy to ``target_port`` that holds each HTTP request ``delay_s`` before passing it on:
    a server that answers, slowly. A request is the first bytes a connection sends after the last answer (the
    client's keep-alive connections carry one request at a time). Runs its own event loop in a thread."""

    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        self.target_port, self.delay_s = target_port, delay_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="latency-proxy", daemon=True)

    def start(self) -> LatencyProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()  # the server is down: the client sees the connection drop
            return
        fresh = [True]

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if fresh[0]:
                    fresh[0] = False
                    self.requests += 1
                    await asyncio.sleep(self.delay_s)
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                fresh[0] = True
                writer.write(data)
                await writer.drain()

        pipes = [asyncio.ensure_future(client_to_server()), asyncio.ensure_future(server_to_client())]
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        for w in (writer, up_writer):
            with contextlib.suppress(OSError, RuntimeError):
                w.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
