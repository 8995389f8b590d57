"""Real servers for integration tests: PostgreSQL, an MLflow tracking server, a Prefect server
and a Prefect worker, each a child process on loopback with a random free port.

Every process runs in its own session (process group) and is stopped with SIGTERM, then
SIGKILL, of the whole group, so a failing test leaves nothing behind. Logs go to files in the
stack's folder; :meth:`ServerStack.logs` returns their tails for assertion messages.

PostgreSQL comes from Debian's ``postgresql`` package (``initdb``/``postgres`` under
``/usr/lib/postgresql/<v>/bin``). When it is missing and we are root, it is installed with
apt-get; otherwise the caller gets :class:`ServersUnavailable` and should skip. As root, the
cluster runs as the ``postgres`` user (``initdb`` refuses root) in a data folder made for it
under the system temp folder (pytest's temp folders are private to root).

Nothing here imports the project: the stack is what production runs (infra/), started by hand.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
WORKER_QUERY_S = 1
"""How often the test worker polls for scheduled flow runs (Prefect's default: 10 s)."""
QUEUE_RETRY_S = 2
"""How long the test Prefect server holds back a run waiting for a deployment's concurrency slot
before it is tried again (Prefect's default: 30 s). What queues and what runs is unchanged."""


class ServersUnavailable(RuntimeError):
    """The machine cannot run the stack (no PostgreSQL and no way to install it)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ManagedProcess:
    """A child process in its own process group, with its output in ``log``."""

    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the group, wait up to ``grace_s``, then SIGKILL what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.popen.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; children of the group may linger, so KILL the group once more
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            break


def start_process(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
                  cwd: Path | None = None, user: str | None = None) -> ManagedProcess:
    """Start ``argv`` in a new session with stdout and stderr to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = log.open("ab")
    try:
        popen = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=str(cwd) if cwd else None, start_new_session=True, user=user,
        )
    finally:
        fh.close()
    return ManagedProcess(name, popen, log)


def wait_http(url: str, proc: ManagedProcess, timeout_s: float, auth: tuple[str, str] | None = None,
              ok=(200,)) -> None:
    """Poll ``url`` until it answers with a status in ``ok``; fail early if ``proc`` died."""
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before it was ready:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
                if resp.status in ok:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            if err.code in ok:
                return
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(err)
        time.sleep(0.5)
    raise TimeoutError(f"{proc.name} not ready at {url} after {timeout_s:.0f}s ({last}):\n{proc.tail()}")


# ----------------------------------------------------------------------------- PostgreSQL


def find_pg_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` with initdb and postgres, or one on PATH."""
    roots = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                   if p.parent.name.isdigit() else 0, reverse=True)
    for bindir in roots:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    initdb = shutil.which("initdb")
    if initdb:
        bindir = Path(initdb).resolve().parent
        if (bindir / "postgres").exists():
            return bindir
    return None


def ensure_postgres(install_timeout_s: float = 240) -> Path:
    """Find PostgreSQL's server binaries; as root, ``apt-get install postgresql`` when absent."""
    bindir = find_pg_bindir()
    if bindir is not None:
        return bindir
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServersUnavailable("PostgreSQL server binaries not found and not root: "
                                 "install Debian's 'postgresql' package to run this test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=install_timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    bindir = find_pg_bindir()
    if bindir is None:
        raise RuntimeError("apt-get installed postgresql but initdb/postgres were not found")
    return bindir


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster: scram passwords over TCP on 127.0.0.1, fsync off."""

    bindir: Path
    port: int = field(default_factory=free_port)
    user: str = "alignflow"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    datadir: Path | None = None
    proc: ManagedProcess | None = None

    def _os_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise ServersUnavailable("running as root but there is no 'postgres' user to own the cluster") from None
        return "postgres"

    def start(self, databases: list[str], timeout_s: float = 60) -> Postgres:
        os_user = self._os_user()
        base = Path(tempfile.mkdtemp(prefix="alignflow-pg-"))
        if os_user:
            entry = pwd.getpwnam(os_user)
            os.chown(base, entry.pw_uid, entry.pw_gid)
        self.datadir = base / "data"
        pwfile = base / "pw"
        pwfile.write_text(self.password + "\n")
        if os_user:
            os.chown(pwfile, pwd.getpwnam(os_user).pw_uid, -1)
        done = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.user, f"--pwfile={pwfile}",
             "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, user=os_user, timeout=120,
        )
        pwfile.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        self.proc = start_process(
            "postgres",
            [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={base}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200"],
            base / "postgres.log", user=os_user,
        )
        self._wait_ready(timeout_s)
        for db in databases:
            self.psql(f'CREATE DATABASE "{db}"')
        return self

    def _psql_argv(self, sql: str, db: str = "postgres") -> list[str]:
        psql = shutil.which("psql") or str(self.bindir / "psql")
        return [psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", db,
                "-v", "ON_ERROR_STOP=1", "-tAc", sql]

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run one SQL statement as the cluster's superuser; return its unaligned output."""
        env = {**os.environ, "PGPASSWORD": self.password}
        done = subprocess.run(self._psql_argv(sql, db), env=env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {done.stderr}")
        return done.stdout.strip()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"postgres exited before it was ready:\n{self.proc.tail()}")
            try:
                self.psql("SELECT 1")
                return
            except RuntimeError:
                time.sleep(0.3)
        raise TimeoutError(f"postgres not ready after {timeout_s}s:\n{self.proc.tail()}")

    def url(self, db: str, driver: str = "postgresql+psycopg") -> str:
        """SQLAlchemy URL of database ``db`` (psycopg 3 for MLflow; ``postgresql+asyncpg`` for Prefect)."""
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        if self.datadir is not None:
            shutil.rmtree(self.datadir.parent, ignore_errors=True)


# ----------------------------------------------------------------------------- the stack


def _base_env(home: Path) -> dict[str, str]:
    """The parent's environment without settings that would point clients elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_")) and k not in ("ALIGNFLOW_HOME",)}
    env.update(PYTHONUNBUFFERED="1", PREFECT_HOME=str(home / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_CLI_COLORS="false",
               DO_NOT_TRACK="1", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    return env


@dataclass
class ServerStack:
    """PostgreSQL + MLflow server (basic auth, artifacts proxied) + Prefect server + worker.

    Both servers require credentials, as in infra/docker-compose.yml. ``client_env`` is what a
    production client gets: PREFECT_API_URL and PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_URI and
    MLFLOW_TRACKING_USERNAME/PASSWORD. Nothing else distinguishes it from the embedded set-up.
    """

    root: Path
    pool: str = "alignflow-process"
    mlflow_user: str = "admin"
    mlflow_password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    prefect_auth: str = field(default_factory=lambda: f"admin:{secrets.token_hex(12)}")
    postgres: Postgres | None = None
    procs: list[ManagedProcess] = field(default_factory=list)
    mlflow_uri: str = ""
    prefect_api_url: str = ""

    @property
    def client_env(self) -> dict[str, str]:
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_API_AUTH_STRING": self.prefect_auth,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "MLFLOW_TRACKING_USERNAME": self.mlflow_user,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
        }

    def env(self, **extra: str) -> dict[str, str]:
        """A full process environment for a client of this stack."""
        return {**_base_env(self.root), **self.client_env, **extra}

    def start(self, timeout_s: float = 150) -> ServerStack:
        """Start PostgreSQL, then the MLflow and Prefect servers side by side; wait for both."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.postgres = Postgres(ensure_postgres()).start(["prefect", "mlflow", "mlflow_auth"])
        mlflow_proc = self._start_mlflow()
        prefect_proc = self._start_prefect()
        deadline = time.monotonic() + timeout_s
        wait_http(f"{self.mlflow_uri}/health", mlflow_proc, deadline - time.monotonic())
        wait_http(f"{self.prefect_api_url}/health", prefect_proc, max(5.0, deadline - time.monotonic()))
        return self

    def _start_mlflow(self) -> ManagedProcess:
        port = free_port()
        self.mlflow_uri = f"http://127.0.0.1:{port}"
        ini = self.root / "mlflow-auth.ini"
        # the same settings infra/docker/mlflow-entrypoint.sh renders in production
        ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {self.postgres.url('mlflow_auth')}\n"
            f"admin_username = {self.mlflow_user}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env = _base_env(self.root)
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=self.mlflow_password,
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
                   # the GenAI job runner (8 huey processes) is not used by alignflow; as in infra/
                   MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        argv = [str(VENV_BIN / "mlflow"), "server", "--app-name", "basic-auth",
                "--backend-store-uri", self.postgres.url("mlflow"),
                "--serve-artifacts", "--artifacts-destination", (self.root / "artifacts").as_uri(),
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                # idle keep-alive connections of the test's clients must not hold up shutdown
                "--uvicorn-opts", "--timeout-graceful-shutdown 2"]
        proc = start_process("mlflow-server", argv, self.root / "mlflow.log", env=env, cwd=self.root)
        self.procs.append(proc)
        return proc

    def _start_prefect(self) -> ManagedProcess:
        port = free_port()
        self.prefect_api_url = f"http://127.0.0.1:{port}/api"
        env = _base_env(self.root)
        env.update(PREFECT_SERVER_DATABASE_CONNECTION_URL=self.postgres.url("prefect", "postgresql+asyncpg"),
                   PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
                   PREFECT_API_URL=self.prefect_api_url, PREFECT_SERVER_LOGGING_LEVEL="WARNING",
                   PREFECT_SERVER_API_AUTH_STRING=self.prefect_auth, PREFECT_API_AUTH_STRING=self.prefect_auth,
                   # a run queued behind a deployment's concurrency limit is retried after this many
                   # seconds (Prefect's default 30 s: the queued run of a test then idles ~30 s)
                   PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS=str(QUEUE_RETRY_S))
        argv = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                "--no-ui", "--analytics-off"]
        proc = start_process("prefect-server", argv, self.root / "prefect-server.log", env=env, cwd=self.root)
        self.procs.append(proc)
        return proc

    def bootstrap(self, gpu_slots: int = 1) -> None:
        """Create the work pool and concurrency limits with the committed bootstrap script."""
        done = subprocess.run(
            [sys.executable, str(REPO_ROOT / "infra" / "bootstrap_prefect.py"), "--pool", self.pool,
             "--type", "process", "--gpu-slots", str(gpu_slots)],
            env=self.env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"bootstrap_prefect.py failed:\n{done.stdout}\n{done.stderr}")

    def start_worker(self, extra_env: dict[str, str] | None = None, limit: int = 2) -> ManagedProcess:
        """A process worker on :attr:`pool`; flow runs inherit its environment."""
        # the worker asks for scheduled runs every WORKER_QUERY_S seconds (Prefect's default 10 s: each
        # triggered run of a test waited up to 10 s to be picked up)
        env = self.env(PREFECT_WORKER_QUERY_SECONDS=str(WORKER_QUERY_S), **(extra_env or {}))
        argv = [str(VENV_BIN / "prefect"), "worker", "start", "--pool", self.pool, "--type", "process",
                "--limit", str(limit), "--prefetch-seconds", "5"]
        proc = start_process("prefect-worker", argv, self.root / "worker.log", env=env, cwd=REPO_ROOT)
        self.procs.append(proc)
        return proc

    def logs(self, lines: int = 40) -> str:
        """Tails of every log, for assertion messages."""
        parts = [f"--- {p.name} ({'alive' if p.alive() else f'exit {p.popen.returncode}'})\n{p.tail(lines)}"
                 for p in self.procs]
        if self.postgres and self.postgres.proc:
            parts.append(f"--- postgres\n{self.postgres.proc.tail(lines)}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop everything, newest first (worker, servers, then PostgreSQL)."""
        for proc in reversed(self.procs):
            proc.stop()
        if self.postgres is not None:
            self.postgres.stop()
