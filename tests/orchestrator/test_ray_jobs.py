"""The same job submitted with `ray job submit` to a Ray head started with `ray start --head`."""

import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from e2e_helpers import REPO_ROOT, free_port, job_runs, runs_by_stage, subprocess_env, tiny_spec, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

RAY = shutil.which("ray")
AGENT_START_TIMEOUT_S = 300


def _wait_for_dashboard(address: str, env: dict, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = subprocess.run([RAY, "job", "list", "--address", address], capture_output=True, text=True, env=env,
                               timeout=60)
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray dashboard at {address} did not answer within {timeout_s} s: {probe.stderr[-2000:]}")


@pytest.fixture
def ray_head():
    """A head node of its own (own ports and temp folder), stopped through its process group."""
    env = subprocess_env()
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")
    dashboard_port = free_port()
    # Every port gets a free one: the agents' defaults (52365 and others) stay taken while any other
    # Ray head runs on the machine, and the job agent then never comes up.
    command = [RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(free_port()),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--temp-dir", temp_dir,
               "--include-dashboard", "true", "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--ray-client-server-port", str(free_port())]
    head = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(address, env)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.skipif(RAY is None, reason="the ray command line is not installed")
def test_ray_job_submit_runs_job_on_cluster(ray_head, tmp_path):
    address, env = ray_head
    spec_path = write_spec(tmp_path, tiny_spec("submitted", random_cells=1))
    output = tmp_path / "out"
    command = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT), "--",
               "python", "-m", "orchestrator", "run", str(spec_path), "--output", str(output)]
    # The head accepts requests before its job agent is up, and Ray then replies that the client should retry.
    # On a loaded 2-core machine the agent took over 90 s to come up.
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    while True:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1100)
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "connecting to the Ray cluster" in result.stdout + result.stderr
    assert "| found:rebar | UNAS (rebar) | 1 (1) |" in result.stdout
    stages = runs_by_stage(job_runs(output))
    assert [len(stages[stage]) for stage in ("job", "search", "evaluate")] == [1, 1, 2]
    assert all(run.info.status == "FINISHED" for runs in stages.values() for run in runs)
    assert (output / "tables" / "results.parquet").is_file()
