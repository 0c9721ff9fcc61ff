"""A job recorded on an MLflow tracking server backed by a real PostgreSQL server.

The fixtures start PostgreSQL (from the system's `postgresql` packages) and `mlflow server` on
127.0.0.1, both on free ports and in temporary folders, and stop them afterwards. The test runs
a small job through the command line against the server and reads its runs back.
"""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
DATABASE = "mlflow"
DATABASE_USER = "unas"
JOB_NAME = "pg-tracking"
SERVER_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 900

# Smaller than jobs/quickstart.yaml: 2 search epochs and 2 evaluation epochs of tiny networks.
TINY_SPEC = {
    "name": JOB_NAME,
    "seed": 0,
    "data": {"name": "digits", "test_fraction": 0.2, "validation_fraction": 0.2},
    "search": {
        "methods": ["rebar"],
        "seeds": [0],
        "chs": 4,
        "layers": 3,
        "epochs": 2,
        "warmup_epochs": 1,
        "batch_size": 128,
        "workers": 1,
        "worker_resources": {"cpus": 1, "gpus": 0},
    },
    "evaluate": {
        "found": True,
        "random_cells": 1,
        "seeds": [0],
        "recipe": {"chs": 4, "layers": 3, "epochs": 2, "warmup_epochs": 1, "batch_size": 64, "cutout": 0},
        "trial_resources": {"cpus": 0.5, "gpus": 0},
        "max_concurrent": 2,
    },
}


def find_postgres_bin_dir() -> Path | None:
    """Return the folder of `pg_ctl` and `initdb`: from PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        folder = Path(on_path).resolve().parent
        if (folder / "initdb").is_file():
            return folder
    candidates = [path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
                  if (path.parent / "initdb").is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else -1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_account() -> str | None:
    """Return the account to run PostgreSQL as when this process is root (postgres rejects root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    pytest.fail("running as root, but neither the 'postgres' nor the 'nobody' account exists to run PostgreSQL")


def as_account(account: str | None, command: list[str]) -> list[str]:
    return ["runuser", "-u", account, "--", *command] if account else command


def run_checked(command: list[str], description: str, timeout_s: int = 120) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, (f"{description} failed with exit status {result.returncode}: {command}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")


def read_log(path: Path, limit: int = 4000) -> str:
    return path.read_text(errors="replace")[-limit:] if path.is_file() else "(no log written)"


@pytest.fixture(scope="module")
def postgres_url():
    """Start a throwaway PostgreSQL server on 127.0.0.1 and yield a URL of its empty `mlflow` database."""
    bin_dir = find_postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (pg_ctl, initdb) not found on PATH or under "
                    "/usr/lib/postgresql/*/bin; install them with `apt-get install -y postgresql` "
                    "(.ci/run does this)")
    try:
        import psycopg2  # the MLflow server's PostgreSQL driver
    except ImportError:
        pytest.fail("psycopg2 is missing, so the MLflow server cannot open PostgreSQL; "
                    "install the test extra with `pip install -e '.[test]'`")

    account = server_account()
    # Not under pytest's tmp_path (or a private TMPDIR): the server account must enter the folder.
    base = Path(tempfile.mkdtemp(prefix="unas-postgres-", dir="/tmp" if account else None))
    data_dir = base / "data"
    log_file = base / "postgres.log"
    if account:
        shutil.chown(base, user=account)
    port = free_port()
    started = False
    try:
        run_checked(as_account(account, [str(bin_dir / "initdb"), "--pgdata", str(data_dir),
                                         "--username", DATABASE_USER, "--auth", "trust", "--encoding", "UTF8",
                                         "--no-locale", "--no-sync"]), "initdb")
        server_options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base}"
        start = subprocess.run(as_account(account, [str(bin_dir / "pg_ctl"), "start", "--pgdata", str(data_dir),
                                                    "--log", str(log_file), "--options", server_options,
                                                    "--wait", "--timeout", "60"]),
                               capture_output=True, text=True, timeout=90)
        started = start.returncode == 0
        assert started, f"pg_ctl start failed ({start.returncode}): {start.stderr}\nserver log:\n{read_log(log_file)}"

        connection = psycopg2.connect(host="127.0.0.1", port=port, user=DATABASE_USER, dbname="postgres")
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            connection.close()

        # The driver is named: SQLAlchemy 2.1 defaults postgresql:// to psycopg 3, not psycopg2.
        yield f"postgresql+psycopg2://{DATABASE_USER}@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started or (data_dir / "postmaster.pid").exists():  # a server that came up after pg_ctl gave up
            subprocess.run(as_account(account, [str(bin_dir / "pg_ctl"), "stop", "--pgdata", str(data_dir),
                                                "--mode", "fast", "--wait", "--timeout", "60"]),
                           capture_output=True, text=True, timeout=90)
        shutil.rmtree(base, ignore_errors=True)


def wait_until_healthy(url: str, process: subprocess.Popen, log_file: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with status {process.returncode} before it was healthy; "
                        f"log:\n{read_log(log_file)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server timed out: {url} did not return 200 within {timeout_s} s; "
                f"log:\n{read_log(log_file)}")


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True and every process it spawned."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    try:  # children (uvicorn workers) may outlive the leader
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def mlflow_server(postgres_url, tmp_path_factory):
    """Start `mlflow server` on PostgreSQL; yield (tracking URI, PostgreSQL URL)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    log_file = folder / "server.log"
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres_url,
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env,
                                   start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", process, log_file, SERVER_START_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}", postgres_url
    finally:
        stop_process_group(process)


def run_job_command(spec_path: Path, output: Path, tracking_uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)  # the job starts its own local Ray runtime
    command = [sys.executable, "-m", "orchestrator", "run", str(spec_path), "--output", str(output),
               "--tracking-uri", tracking_uri]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_process_group(process)
        stdout, stderr = process.communicate()
        pytest.fail(f"unas run timed out after {JOB_TIMEOUT_S} s and was stopped; stderr tail:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def genotype_of(client, run) -> dict:
    local = client.download_artifacts(run.info.run_id, "genotype.json")
    return json.loads(Path(local).read_text())


def test_job_records_runs_on_postgres_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    tracking_uri, postgres_url = mlflow_server
    spec_path = tmp_path / "pg-tracking.yaml"
    spec_path.write_text(yaml.safe_dump(TINY_SPEC, sort_keys=False))
    output = tmp_path / "output"

    result = run_job_command(spec_path, output, tracking_uri)
    assert result.returncode == 0, f"unas run failed ({result.returncode}); stderr tail:\n{result.stderr[-6000:]}"
    assert (output / "tables" / "results.md").is_file()

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(JOB_NAME)
    assert experiment is not None, f"no experiment {JOB_NAME!r} on the server"
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("unas.stage"), []).append(run)
    assert sorted(by_stage) == ["evaluate", "job", "search"]
    assert len(by_stage["job"]) == 1
    assert len(by_stage["search"]) == 1
    assert len(by_stage["evaluate"]) == 2

    parent = by_stage["job"][0]
    for run in runs:
        assert run.info.status == "FINISHED", f"{run.info.run_name}: {run.info.status}"
    for run in by_stage["search"] + by_stage["evaluate"]:
        assert run.data.tags.get("mlflow.parentRunId") == parent.info.run_id, run.info.run_name
        assert run.data.tags.get("unas.job_id") == parent.data.tags.get("unas.job_id"), run.info.run_name

    groups = sorted(run.data.tags.get("unas.group") for run in by_stage["evaluate"])
    assert groups == ["found", "random"]

    for run in by_stage["search"] + by_stage["evaluate"]:
        artifact_paths = [item.path for item in client.list_artifacts(run.info.run_id)]
        assert "genotype.json" in artifact_paths, f"{run.info.run_name}: artifacts {artifact_paths}"
        genotype = genotype_of(client, run)
        assert sorted(genotype) == ["normal", "reduce"], f"{run.info.run_name}: {genotype}"

    found_run = next(run for run in by_stage["evaluate"] if run.data.tags.get("unas.group") == "found")
    assert genotype_of(client, found_run) == genotype_of(client, by_stage["search"][0])
    assert "final_test_error" in found_run.data.metrics

    # The runs are rows of the PostgreSQL database, not of a store the client fell back to.
    import psycopg2

    connection = psycopg2.connect(postgres_url.replace("postgresql+psycopg2://", "postgresql://"))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = %s",
                           (int(experiment.experiment_id),))
            rows = dict(cursor.fetchall())
    finally:
        connection.close()
    assert rows == {run.info.run_id: "FINISHED" for run in runs}
