"""The container files in docker/ refer only to files, specs, images and options that exist.

The tests need no Docker engine and no Kubernetes cluster. They parse the files and look up every
path in the repository. Every job spec must pass `python -m orchestrator validate`, and every
command-line option must exist in the installed `ray`, `mlflow` and `unas` command lines.
"""

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml

from orchestrator.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
DOCKERIGNORE = DOCKER_DIR / "Dockerfile.dockerignore"
UNAS_JOB = DOCKER_DIR / "unas-job"
COMPOSE = DOCKER_DIR / "compose.yaml"
COMPOSE_GPU = DOCKER_DIR / "compose.gpu.yaml"
RAYJOB = DOCKER_DIR / "rayjob.yaml"

IMAGE_PROJECT_DIR = PurePosixPath("/opt/unas")  # where the Dockerfile copies the repository
COMPOSE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


# ---------------------------------------------------------------- helpers


def expand_compose_defaults(text: str) -> str:
    """Replace each ${VAR:-default} with its default, as Compose does when VAR is unset."""
    return COMPOSE_VARIABLE.sub(lambda match: match.group(2) or "", text)


def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(expand_compose_defaults(path.read_text()))


def load_rayjob_documents() -> dict[str, dict]:
    documents = [doc for doc in yaml.safe_load_all(RAYJOB.read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in documents}
    assert len(by_kind) == len(documents), "rayjob.yaml holds two documents of the same kind"
    return by_kind


def command_tokens(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(token) for token in command]


def option_names(tokens: list[str]) -> list[str]:
    """Return the long options (without values) among the tokens."""
    return [token.split("=", 1)[0] for token in tokens if token.startswith("--") and token != "--"]


def option_value(tokens: list[str], name: str) -> str | None:
    for index, token in enumerate(tokens):
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
        if token == name and index + 1 < len(tokens):
            return tokens[index + 1]
    return None


def click_options(command) -> set[str]:
    return {option for param in command.params for option in param.opts + param.secondary_opts}


def ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return click_options(start)


def ray_job_submit_options() -> set[str]:
    from ray.dashboard.modules.job.cli import submit

    return click_options(submit)


def mlflow_server_options() -> set[str]:
    from mlflow.cli import server

    return click_options(server)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (instruction, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_arg_defaults() -> dict[str, str | None]:
    defaults = {}
    for keyword, arguments in dockerfile_instructions():
        if keyword == "ARG":
            name, _, value = arguments.partition("=")
            defaults[name] = value or None
    return defaults


def dockerfile_copies() -> list[tuple[list[str], str]]:
    """Return (sources, destination) of each COPY from the build context (not from a stage)."""
    copies = []
    for keyword, arguments in dockerfile_instructions():
        if keyword != "COPY":
            continue
        tokens = shlex.split(arguments)
        if any(token.startswith("--from") for token in tokens):
            continue
        tokens = [token for token in tokens if not token.startswith("--")]
        copies.append((tokens[:-1], tokens[-1]))
    return copies


def image_path_in_repo(path: str) -> Path:
    """Map a path that the image resolves against /opt/unas to the repository file it copies."""
    posix = PurePosixPath(path)
    if posix.is_absolute():
        return REPO_ROOT / posix.relative_to(IMAGE_PROJECT_DIR)
    return REPO_ROOT / posix


def validate_specs(paths: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "validate", *map(str, paths)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def assert_specs_valid(paths: list[Path]) -> None:
    result = validate_specs(paths)
    assert result.returncode == 0, f"invalid spec(s) {paths}:\n{result.stderr}"


def assert_unas_run_options_parse(spec: str, options: list[str]) -> None:
    """`unas-job SPEC OPTIONS` runs `unas run SPEC OPTIONS`: the options must exist in the CLI."""
    try:
        build_parser().parse_args(["run", spec, *options])
    except SystemExit as error:
        pytest.fail(f"`unas run {spec} {' '.join(options)}` is not a valid command line (exit {error.code})")


def dependency_pins() -> dict[str, str]:
    """Return each `name[extras]==version` dependency of pyproject.toml as {name[extras]: version}."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        name, separator, version = requirement.partition("==")
        if separator:
            pins[name.strip()] = version.strip()
    return pins


def ignored_by_dockerignore(path: str, patterns: list[str]) -> bool:
    """Apply .dockerignore rules in order (last match wins; a match on a parent folder counts)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:count]) for count in range(1, len(parts) + 1)]
    ignored = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw[1:] if negated else raw
        if pattern.startswith("**/"):
            matched = any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        else:
            matched = any(fnmatch.fnmatchcase(prefix, pattern.rstrip("/")) for prefix in prefixes)
        if matched:
            ignored = not negated
    return ignored


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def ray_services(compose: dict) -> dict[str, dict]:
    """Return the services whose command runs the `ray` command line."""
    return {name: service for name, service in compose["services"].items()
            if command_tokens(service.get("command", []))[:1] == ["ray"]}


def pod_containers(rayjob: dict) -> list[tuple[dict, dict]]:
    """Return (pod spec, container) of the head and of every worker group."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    return [(pod, container) for pod in pods for container in pod["containers"]]


def container_env(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def mounts_by_volume(pod: dict, container: dict) -> dict[str, tuple[dict, str]]:
    """Return {volume name: (volume definition, mount path)} for the container's mounts."""
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        assert mount["name"] in volumes, f"volumeMount {mount['name']!r} has no volume in its pod"
        mounts[mount["name"]] = (volumes[mount["name"]], mount["mountPath"])
    return mounts


def rayjob_spec_text(documents: dict[str, dict]) -> tuple[str, str]:
    """Return (path, YAML text) of the spec the RayJob entrypoint runs."""
    rayjob = documents["RayJob"]
    tokens = command_tokens(rayjob["spec"]["entrypoint"])
    assert tokens[0] == "unas-job", f"entrypoint {tokens} does not run unas-job"
    spec_path = tokens[1]
    head_pod = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head = head_pod["containers"][0]
    for volume, mount_path in mounts_by_volume(head_pod, head).values():
        if "configMap" in volume and PurePosixPath(spec_path).parent == PurePosixPath(mount_path):
            config_map = documents["ConfigMap"]
            assert config_map["metadata"]["name"] == volume["configMap"]["name"]
            key = PurePosixPath(spec_path).name
            assert key in config_map["data"], f"ConfigMap {volume['configMap']['name']} has no key {key}"
            return spec_path, config_map["data"][key]
    repo_path = image_path_in_repo(spec_path)
    assert repo_path.is_file(), f"entrypoint spec {spec_path} is neither in a mounted ConfigMap nor in the image"
    return spec_path, repo_path.read_text()


def quantity_to_float(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_copy_sources_exist():
    copies = dockerfile_copies()
    assert copies, "the Dockerfile copies nothing from the build context"
    for sources, destination in copies:
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source} {destination}: {source} is not in the repository"


def test_dockerfile_copies_every_package():
    copied = {source.rstrip("/") for sources, _ in dockerfile_copies() for source in sources}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = [pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in packages:
        assert package in copied, f"package {package} (pyproject.toml) is not copied into the image"
    assert "pyproject.toml" in copied
    assert "README.md" in copied, "pyproject.toml names README.md as the readme, so the install needs it"


def test_dockerignore_keeps_copied_files():
    patterns = dockerignore_patterns()
    for sources, _ in dockerfile_copies():
        for source in sources:
            path = REPO_ROOT / source
            files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
            for file in files:
                relative = file.relative_to(REPO_ROOT).as_posix()
                if "__pycache__" in relative:
                    continue
                assert not ignored_by_dockerignore(relative, patterns), f"{relative} is copied but ignored"


def test_dockerignore_drops_outputs():
    patterns = dockerignore_patterns()
    for path in ("runs/quickstart/mlflow.db", ".git/HEAD", "unas_ray.egg-info/PKG-INFO",
                 "orchestrator/__pycache__/cli.cpython-311.pyc"):
        assert ignored_by_dockerignore(path, patterns), f"{path} would be sent to the build"


def test_dockerfile_pins_match_pyproject():
    defaults = dockerfile_arg_defaults()
    pins = dependency_pins()
    assert defaults["TORCH_VERSION"] == pins["torch"]
    assert defaults["TORCHVISION_VERSION"] == pins["torchvision"]
    assert defaults["MLFLOW_VERSION"] == pins["mlflow"]
    assert defaults["RAY_VERSION"] == pins["ray[default,train,tune]"]
    runs = " ".join(arguments for keyword, arguments in dockerfile_instructions() if keyword == "RUN")
    assert '"ray[default,train,tune]==${RAY_VERSION}"' in runs


def test_dockerfile_torch_variants():
    defaults = dockerfile_arg_defaults()
    assert defaults["TORCH_VARIANT"] == "cu130", "the default image is the CUDA build"
    runs = " ".join(arguments for keyword, arguments in dockerfile_instructions() if keyword == "RUN")
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in runs
    compose = yaml.safe_load(COMPOSE.read_text())
    build_args = compose["x-unas-image"]["build"]["args"]
    assert expand_compose_defaults(build_args["TORCH_VARIANT"]) == "cpu", "compose builds the CPU image by default"


def test_dockerfile_default_command_runs_valid_spec():
    commands = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "CMD"]
    assert len(commands) == 1
    command = json.loads(commands[0])
    assert command[0] == "unas-job"
    installed = {destination for _, destination in dockerfile_copies()}
    assert "/usr/local/bin/unas-job" in installed, "the default command's program is not installed"
    spec = image_path_in_repo(command[1])
    assert spec.is_file(), f"default command's spec {command[1]} is not in the repository"
    assert_specs_valid([spec])
    assert_unas_run_options_parse(command[1], command[2:])


# ---------------------------------------------------------------- unas-job


def run_unas_job(tmp_path: Path, args: list[str], tracking_uri: str | None) -> subprocess.CompletedProcess:
    """Run docker/unas-job with a stand-in `unas` that prints its folder and arguments as JSON."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    stub = stub_dir / "unas"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps({'cwd': os.getcwd(), 'argv': sys.argv[1:]}))\n")
    stub.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update({"PATH": f"{stub_dir}{os.pathsep}{env.get('PATH', '')}", "UNAS_HOME": str(REPO_ROOT),
                "UNAS_DATA": str(tmp_path / "data")})
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return subprocess.run(["bash", str(UNAS_JOB), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


def test_unas_job_script_syntax():
    result = subprocess.run(["bash", "-n", str(UNAS_JOB)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(UNAS_JOB, os.X_OK), "docker/unas-job is not executable"


def test_unas_job_adds_tracking_uri(tmp_path):
    result = run_unas_job(tmp_path, ["jobs/quickstart.yaml", "--output", "out"], "http://mlflow:5000")
    assert result.returncode == 0, result.stderr
    call = json.loads(result.stdout)
    assert call["cwd"] == str(tmp_path / "data")
    assert call["argv"] == ["run", str(REPO_ROOT / "jobs" / "quickstart.yaml"),
                            "--tracking-uri", "http://mlflow:5000", "--output", "out"]
    args = build_parser().parse_args(call["argv"])
    assert args.tracking_uri == "http://mlflow:5000"


def test_unas_job_explicit_tracking_uri_wins(tmp_path):
    result = run_unas_job(tmp_path, ["jobs/quickstart.yaml", "--tracking-uri", "sqlite:///x.db"], "http://mlflow:5000")
    assert result.returncode == 0, result.stderr
    args = build_parser().parse_args(json.loads(result.stdout)["argv"])
    assert args.tracking_uri == "sqlite:///x.db"


def test_unas_job_without_tracking_uri(tmp_path):
    spec = tmp_path / "local.yaml"
    spec.write_text((REPO_ROOT / "jobs" / "quickstart.yaml").read_text())
    result = run_unas_job(tmp_path, ["local.yaml"], None)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["argv"] == ["run", str(spec)]


def test_unas_job_missing_spec(tmp_path):
    result = run_unas_job(tmp_path, ["jobs/no-such-spec.yaml"], None)
    assert result.returncode == 2
    assert "jobs/no-such-spec.yaml" in result.stderr
    assert result.stdout == ""


def test_unas_job_usage_without_spec(tmp_path):
    result = run_unas_job(tmp_path, [], None)
    assert result.returncode == 2
    assert "usage: unas-job SPEC" in result.stderr


# ---------------------------------------------------------------- compose


def test_compose_build_paths_exist():
    compose = load_compose()
    declared_args = dockerfile_arg_defaults()
    built = [(name, service) for name, service in compose["services"].items() if "build" in service]
    assert built, "no service builds the project image"
    for name, service in built:
        context = (COMPOSE.parent / service["build"]["context"]).resolve()
        assert context == REPO_ROOT, f"{name}: build context {context} is not the repository root"
        dockerfile = context / service["build"]["dockerfile"]
        assert dockerfile.resolve() == DOCKERFILE, f"{name}: builds {dockerfile}"
        for arg in service["build"].get("args", {}):
            assert arg in declared_args, f"{name}: build arg {arg} is not an ARG of the Dockerfile"


def test_compose_images_built_or_pinned():
    compose = load_compose()
    built_images = {service["image"] for service in compose["services"].values() if "build" in service}
    for name, service in compose["services"].items():
        image = service["image"]
        if "build" in service:
            continue
        assert image not in built_images, f"{name}: runs the project image without a build section, so Compose pulls it"
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: image {image} has no tag"
        assert tag != "latest", f"{name}: image {image} is not pinned to a version"


def test_compose_references_exist():
    compose = load_compose()
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on an unknown service {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared_volumes, f"{name} mounts an undeclared volume {source}"


def test_compose_ray_auth_mode_consistent():
    compose = load_compose()
    services = ray_services(compose)
    assert {"ray-head", "ray-worker", "submit"} <= set(services)
    modes = {name: (service.get("environment") or {}).get("RAY_AUTH_MODE") for name, service in services.items()}
    assert None not in modes.values(), f"services without RAY_AUTH_MODE: {modes}"
    assert len(set(modes.values())) == 1, f"RAY_AUTH_MODE differs: {modes}"


def test_compose_ray_options_exist():
    compose = load_compose()
    start_options, submit_options = ray_start_options(), ray_job_submit_options()
    for name, service in ray_services(compose).items():
        tokens = command_tokens(service["command"])
        if tokens[1] == "start":
            unknown = set(option_names(tokens[2:])) - start_options
            assert not unknown, f"{name}: `ray start` has no option {sorted(unknown)}"
        else:
            assert tokens[1:3] == ["job", "submit"], f"{name}: unexpected command {tokens}"
            client_tokens = tokens[3:tokens.index("--")]
            unknown = set(option_names(client_tokens)) - submit_options
            assert not unknown, f"{name}: `ray job submit` has no option {sorted(unknown)}"


def test_compose_mlflow_options_exist():
    tokens = command_tokens(load_compose()["services"]["mlflow"]["command"])
    assert tokens[:2] == ["mlflow", "server"]
    unknown = set(option_names(tokens[2:])) - mlflow_server_options()
    assert not unknown, f"`mlflow server` has no option {sorted(unknown)}"


def test_compose_submit_runs_valid_spec():
    tokens = command_tokens(load_compose()["services"]["submit"]["command"])
    entrypoint = tokens[tokens.index("--") + 1:]
    assert entrypoint[0] == "unas-job", f"the submitted entrypoint is {entrypoint}"
    spec = image_path_in_repo(entrypoint[1])
    assert spec.is_file(), f"submitted spec {entrypoint[1]} is not in the repository"
    assert_specs_valid([spec])
    assert_unas_run_options_parse(entrypoint[1], entrypoint[2:])


def test_compose_cluster_addresses_match():
    services = load_compose()["services"]
    head = command_tokens(services["ray-head"]["command"])
    worker = command_tokens(services["ray-worker"]["command"])
    submit = command_tokens(services["submit"]["command"])
    assert "--head" in head
    assert option_value(worker, "--address") == f"ray-head:{option_value(head, '--port')}"
    dashboard_port = option_value(head, "--dashboard-port") or "8265"
    assert option_value(submit, "--address") == f"http://ray-head:{dashboard_port}"
    assert option_value(head, "--dashboard-host") == "0.0.0.0", "the submit container cannot reach the dashboard"


def test_compose_tracking_uri_reaches_mlflow():
    compose = load_compose()
    mlflow = command_tokens(compose["services"]["mlflow"]["command"])
    for name, service in ray_services(compose).items():
        uri = urlparse(service["environment"]["MLFLOW_TRACKING_URI"])
        assert uri.hostname in compose["services"], f"{name}: tracking host {uri.hostname} is not a service"
        server = command_tokens(compose["services"][uri.hostname]["command"])
        assert server[:2] == ["mlflow", "server"]
        assert str(uri.port) == option_value(server, "--port")
        assert option_value(server, "--host") == "0.0.0.0"
        allowed = option_value(mlflow, "--allowed-hosts").split(",")
        assert uri.netloc in allowed, f"MLflow rejects the Host header {uri.netloc}; allowed: {allowed}"
    backend = urlparse(option_value(mlflow, "--backend-store-uri"))
    assert backend.scheme == "postgresql+psycopg2"
    assert backend.hostname in compose["services"]
    assert compose["services"][backend.hostname]["image"].startswith("postgres:")


def test_compose_shared_data_volume():
    compose = load_compose()
    services = compose["services"]
    mounts = {}
    for name in ("ray-head", "ray-worker", "mlflow"):
        mounts[name] = {volume.split(":")[1]: volume.split(":")[0] for volume in services[name]["volumes"]}
    data_dirs = {service["environment"]["UNAS_DATA"] for service in ray_services(compose).values()}
    assert len(data_dirs) == 1
    data_dir = data_dirs.pop()
    volumes = {name: service_mounts.get(data_dir) for name, service_mounts in mounts.items()}
    assert None not in volumes.values(), f"a service lacks a volume at {data_dir}: {volumes}"
    assert len(set(volumes.values())) == 1, f"different volumes at {data_dir}: {volumes}"
    artifacts = option_value(command_tokens(services["mlflow"]["command"]), "--artifacts-destination")
    assert PurePosixPath(artifacts).is_relative_to(data_dir)


def test_compose_gpu_override():
    base = load_compose()
    override = load_compose(COMPOSE_GPU)
    for name, service in override["services"].items():
        assert name in base["services"], f"compose.gpu.yaml overrides an unknown service {name}"
    devices = override["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]


# ---------------------------------------------------------------- RayJob


def test_rayjob_documents():
    documents = load_rayjob_documents()
    assert set(documents) == {"PersistentVolumeClaim", "ConfigMap", "RayJob"}
    rayjob = documents["RayJob"]
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == dependency_pins()["ray[default,train,tune]"]
    assert "ReadWriteMany" in documents["PersistentVolumeClaim"]["spec"]["accessModes"]


def test_rayjob_entrypoint_runs_valid_spec(tmp_path):
    documents = load_rayjob_documents()
    spec_path, text = rayjob_spec_text(documents)
    spec_file = tmp_path / PurePosixPath(spec_path).name
    spec_file.write_text(text)
    assert_specs_valid([spec_file])
    tokens = command_tokens(documents["RayJob"]["spec"]["entrypoint"])
    assert_unas_run_options_parse(spec_path, tokens[2:])


def test_rayjob_spec_is_quickstart_on_gpus():
    _, text = rayjob_spec_text(load_rayjob_documents())
    gpu_spec = yaml.safe_load(text)
    quickstart = yaml.safe_load((REPO_ROOT / "jobs" / "quickstart.yaml").read_text())
    assert gpu_spec["search"]["worker_resources"]["gpus"] >= 1
    assert 0 < gpu_spec["evaluate"]["trial_resources"]["gpus"] <= 1
    assert gpu_spec["expected_gpus"] >= 1
    for spec in (gpu_spec, quickstart):
        for key in ("name", "description", "expected_gpus"):
            spec.pop(key)
        spec["search"].pop("worker_resources")
        spec["evaluate"].pop("trial_resources")
    assert gpu_spec == quickstart


def test_rayjob_spec_fits_gpu_workers():
    documents = load_rayjob_documents()
    spec = yaml.safe_load(rayjob_spec_text(documents)[1])
    groups = documents["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = []
    for group in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if quantity_to_float(limits.get("nvidia.com/gpu", 0)) > 0:
            gpu_groups.append((group, limits))
    assert gpu_groups, "no worker group has GPUs"
    total_gpus = sum(quantity_to_float(limits["nvidia.com/gpu"]) * group["replicas"] for group, limits in gpu_groups)
    largest_gpus = max(quantity_to_float(limits["nvidia.com/gpu"]) for _, limits in gpu_groups)
    largest_cpus = max(quantity_to_float(limits["cpu"]) for _, limits in gpu_groups)
    search, evaluate = spec["search"], spec["evaluate"]
    assert search["workers"] * search["worker_resources"]["gpus"] <= total_gpus
    assert search["worker_resources"]["gpus"] <= largest_gpus
    assert search["worker_resources"]["cpus"] <= largest_cpus
    assert evaluate["trial_resources"]["gpus"] <= largest_gpus
    assert evaluate["trial_resources"]["cpus"] <= largest_cpus
    assert spec["expected_gpus"] <= total_gpus


def test_rayjob_data_volume_and_tracking_uri():
    documents = load_rayjob_documents()
    claim = documents["PersistentVolumeClaim"]["metadata"]["name"]
    containers = pod_containers(documents["RayJob"])
    assert len(containers) >= 2, "expected a head and at least one worker container"
    for pod, container in containers:
        env = container_env(container)
        uri = urlparse(env.get("MLFLOW_TRACKING_URI") or "")
        assert uri.scheme in ("http", "https"), f"{container['name']}: MLFLOW_TRACKING_URI is {uri.geturl()!r}"
        assert uri.hostname, f"{container['name']}: MLFLOW_TRACKING_URI {uri.geturl()!r} has no host"
        claims = {volume["persistentVolumeClaim"]["claimName"]: path
                  for volume, path in mounts_by_volume(pod, container).values() if "persistentVolumeClaim" in volume}
        assert claims.get(claim) == env.get("UNAS_DATA"), f"{container['name']}: {claim} mounts {claims}, UNAS_DATA {env}"
        assert pod.get("securityContext", {}).get("fsGroup") == 1000, "the image's user `ray` (uid 1000) cannot write"


def test_rayjob_images_and_start_params():
    documents = load_rayjob_documents()
    cluster = documents["RayJob"]["spec"]["rayClusterSpec"]
    images = {container["image"] for _, container in pod_containers(documents["RayJob"])}
    assert len(images) == 1, f"head and workers run different images: {images}"
    assert images.pop().rpartition(":")[2] == "gpu", "the GPU cluster needs the CUDA build (tag gpu)"
    start_options = ray_start_options()
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for key in group["rayStartParams"]:
            assert f"--{key}" in start_options, f"`ray start` has no option --{key}"
    assert cluster["authOptions"]["mode"] in ("token", "disabled")


# ---------------------------------------------------------------- README


def test_readme_cluster_section_names_existing_files():
    readme = (REPO_ROOT / "README.md").read_text()
    heading = "## Running on a cluster"
    assert heading in readme
    section = readme.split(heading, 1)[1].split("\n## ", 1)[0]
    paths = set(re.findall(r"(?<![/\w])(?:docker|jobs)/[A-Za-z0-9_.-]+", section))  # not /data/jobs/...
    assert {"docker/Dockerfile", "docker/compose.yaml", "docker/rayjob.yaml"} <= paths
    for path in paths:
        assert (REPO_ROOT / path).exists(), f"README names {path}, which does not exist"
