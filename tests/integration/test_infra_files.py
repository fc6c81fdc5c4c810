"""The deployment files under infra/ stay consistent: the compose stack, its .env.example, the
CUDA worker image and the Kubernetes work-pool template. No Docker engine is needed; the
work-pool template is checked with Prefect's own validation and templating."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
DOCKERFILE = INFRA / "Dockerfile"
K8S_TEMPLATE = INFRA / "k8s" / "work-pool-job-template.json"

# services that must keep their state in named volumes
STATEFUL = {"postgres": "/var/lib/postgresql/data", "minio": "/data",
            "prefect-server": "/var/lib/prefect"}
# `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`, `$VAR`;
# `$$` is compose's escape for a literal `$` (expanded later by the container's shell)
INTERPOLATION = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+][^}]*)?\}"
                           r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|AUTH_STRING", re.IGNORECASE)


def compose_variables(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        line = line.replace("$$", "")  # escaped dollars are not compose variables
        for m in INTERPOLATION.finditer(line):
            names.add(m.group("braced") or m.group("bare"))
    return names


def parse_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}:{n}: {line!r}"
        assert key not in values, f"{path.name}:{n}: {key} defined twice"
        values[key] = value
    return values


@pytest.fixture(scope="module")
def compose() -> dict:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and doc.get("services"), "compose file has no services"
    return doc


@pytest.fixture(scope="module")
def services(compose) -> dict:  # noqa: ANN001
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


def test_the_stack_has_every_service(services):  # noqa: ANN001
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker",
            "gpu-worker"} <= set(services)


def one_shot(services: dict, name: str) -> bool:
    """A service that runs once and exits: not restarted, and whatever depends on it waits
    for it to complete successfully (a healthcheck would never run)."""
    waiting = []
    for svc in services.values():
        deps = svc.get("depends_on") or {}
        if name in deps:  # the short (list) form waits for a start only
            waiting.append(deps[name].get("condition") if isinstance(deps, dict) else None)
    return (services[name].get("restart") == "no" and bool(waiting)
            and all(c == "service_completed_successfully" for c in waiting))


def test_every_service_has_an_image_or_build_and_a_healthcheck(services):  # noqa: ANN001
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name}: neither image nor build"
        if one_shot(services, name) and "healthcheck" not in svc:
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck test"


def test_images_are_pinned(services):  # noqa: ANN001
    for name, svc in services.items():
        image = svc.get("image")
        if image is None:
            continue
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest" and "latest" not in tag.split("-"), f"{name}: {image}"


def test_published_ports_are_bound_to_localhost(services):  # noqa: ANN001
    published = 0
    for name, svc in services.items():
        for port in svc.get("ports", []):
            if isinstance(port, dict):  # long syntax
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
            published += 1
    assert published >= 4


def test_every_compose_variable_is_defined_in_env_example(env_example):  # noqa: ANN001
    used = compose_variables(COMPOSE.read_text())
    assert used, "the compose file reads no variables"
    missing = sorted(used - set(env_example))
    assert not missing, f"used in docker-compose.yml but not in .env.example: {missing}"
    unused = sorted(set(env_example) - used)
    assert not unused, f"in .env.example but unused by docker-compose.yml: {unused}"


def test_variable_scanner_sees_every_form_and_skips_escapes():
    text = "a: ${A}\nb: ${B:-x}\nc: ${C:?set C}\nd: $D\ne: $${NOT_ME} $$ALSO_NOT\n# ${COMMENT}\n"
    assert compose_variables(text) == {"A", "B", "C", "D"}


def test_env_example_holds_placeholders_not_secrets(env_example):  # noqa: ANN001
    secrets = {k: v for k, v in env_example.items() if SECRET_NAME.search(k)}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(secrets)
    for key, value in secrets.items():
        assert "change-me" in value, f"{key} must be a change-me placeholder, not {value!r}"
    for key, value in env_example.items():
        assert not re.search(r"AKIA[0-9A-Z]{16}", value), f"{key} looks like an AWS key"
        # a long run of mixed letters and digits reads like a generated secret
        for token in re.findall(r"[A-Za-z0-9+/_]{20,}", value):
            assert not (re.search(r"\d", token) and re.search(r"[A-Za-z]", token)), \
                f"{key}={value!r} looks like a real secret"


def test_stateful_services_keep_state_in_declared_named_volumes(compose, services):  # noqa: ANN001
    declared = set(compose.get("volumes") or {})
    for name, target in STATEFUL.items():
        mounts = {}
        for vol in services[name].get("volumes", []):
            source, _, rest = vol.partition(":") if isinstance(vol, str) else (
                vol["source"], None, vol["target"])
            mounts[rest.split(":")[0]] = source
        assert target in mounts, f"{name}: nothing mounted at {target}"
        assert mounts[target] in declared, f"{name}: {mounts[target]} is not a named volume"


def test_gpu_worker_is_optional_and_reserves_an_nvidia_gpu(services):  # noqa: ANN001
    gpu = services["gpu-worker"]
    assert gpu.get("profiles") == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               for d in devices)
    assert gpu["build"]["dockerfile"] == "infra/Dockerfile"
    assert (COMPOSE.parent / gpu["build"]["context"] / gpu["build"]["dockerfile"]).is_file()
    for name, svc in services.items():
        if name != "gpu-worker":
            assert "profiles" not in svc, f"{name} should start without a profile"


def test_workers_poll_process_pools_of_the_prefect_server(services):  # noqa: ANN001
    for name in ("prefect-worker", "gpu-worker"):
        svc = services[name]
        command = " ".join(svc["command"])
        assert "worker start" in command and "--type process" in command, name
        assert svc["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert svc["environment"]["BIGMODEL_TRACKING_URI"] == "http://mlflow:5000"
        assert "prefect-server" in svc["depends_on"]


def test_mlflow_uses_basic_auth_postgres_and_proxied_minio_artifacts(services):  # noqa: ANN001
    mlflow = services["mlflow"]
    command = " ".join(mlflow["command"]) if isinstance(mlflow["command"], list) else mlflow["command"]
    assert "mlflow server" in command
    assert re.search(r"--app-name[ =]basic-auth", command)
    assert "--serve-artifacts" in command and "--workers 1" in command
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${")
    # other containers reach it as mlflow:5000; MLflow rejects Host headers it does not know
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_dockerfile_is_cuda_python311_from_the_lock_as_non_root():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    assert froms and re.match(r"(nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu|pytorch/pytorch:.*cuda)",
                              froms[-1]), froms
    assert ":latest" not in froms[-1]
    assert "python3.11" in text
    assert "requirements.lock" in text
    assert re.search(r"--index-url\s+\"?https://download\.pytorch\.org/whl/(\$\{TORCH_CUDA\}|cu12\d)",
                     text)
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root USER"
    assert "WORKDIR /app" in lines
    cmd = [ln for ln in lines if ln.upper().startswith(("CMD ", "ENTRYPOINT "))]
    assert cmd and "prefect worker start" in cmd[-1]


def test_k8s_work_pool_template_is_valid_for_prefect_and_requests_a_gpu():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import validate
    from prefect.utilities.templating import apply_values

    template = json.loads(K8S_TEMPLATE.read_text())
    assert set(template) == {"job_configuration", "variables"}
    # Prefect's own check: every placeholder in job_configuration is a declared variable
    WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=template)
    props = template["variables"]["properties"]
    assert {"image", "namespace", "env"} <= set(props)
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    validate(defaults, template["variables"], raise_on_error=True, ignore_required=True)

    config = apply_values(template["job_configuration"], defaults)
    manifest = config["job_manifest"]
    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"
    assert container["image"] == props["image"]["default"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert config["namespace"] == manifest["metadata"]["namespace"] == "bigmodel"
    assert container["env"]["DO_NOT_TRACK"] == "true"
    assert not any(SECRET_NAME.search(k) for k in container["env"]), "credentials belong in a Secret"


def test_mlflow_server_script_is_executable_bash():
    script = INFRA / "mlflow-server.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "--host 127.0.0.1" in text and "exec " in text
    assert os.access(script, os.X_OK)


@pytest.mark.slow
def test_a_prefect_server_accepts_the_k8s_template_as_a_kubernetes_pool(prefect_harness):  # noqa: ANN001
    """What `prefect work-pool create gpu-k8s --type kubernetes --base-job-template ...` does."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate as ClientWorkPoolCreate

    template = json.loads(K8S_TEMPLATE.read_text())
    with get_client(sync_client=True) as client:
        client.create_work_pool(ClientWorkPoolCreate(
            name="bigmodel-test-gpu-k8s", type="kubernetes", base_job_template=template),
            overwrite=True)
        pool = client.read_work_pool("bigmodel-test-gpu-k8s")
    assert pool.type == "kubernetes"
    assert pool.base_job_template == template
