"""cluster_configs/: the checks `ray up` and `kubectl apply` would otherwise fail on after minutes of provisioning.

Every file parses; launcher configs pass Ray's own schema and validation; GPU workers scale from zero;
token auth is on everywhere; every Ray, torch and tclora version agrees with pyproject.toml and the
Makefile. No cloud, no cluster, no network.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CC = ROOT / "cluster_configs"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
YAMLS = sorted(str(p.relative_to(CC)) for p in CC.rglob("*.yaml"))
# The command each header must show, with the file's real path (catches a moved file or a stale header).
HEADER_COMMANDS = {
    "aws.yaml": "ray up -y cluster_configs/aws.yaml",
    "gcp.yaml": "ray up -y cluster_configs/gcp.yaml",
    "kuberay/raycluster.yaml": "kubectl apply -f cluster_configs/kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml": "kubectl apply -f cluster_configs/kuberay/rayjob.yaml",
    "runtime_env.yaml": "--runtime-env cluster_configs/runtime_env.yaml",
    "kuberay/runtime_env.yaml": "--runtime-env cluster_configs/kuberay/runtime_env.yaml",
}

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PYPROJECT["version"]
DEPS = {Requirement(d).name: Requirement(d).specifier for d in PYPROJECT["dependencies"]}
TORCH_PIN = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)


def _text(name: str) -> str:
    return (CC / name).read_text()


def _load(name: str) -> dict:
    return yaml.safe_load(_text(name))


def _gpus(node_type: dict) -> int:
    return node_type.get("resources", {}).get("GPU", 0)


def test_every_file_is_covered():
    assert set(YAMLS) == set(HEADER_COMMANDS), "a new cluster config needs its header command listed here"
    assert (CC / "README.md").is_file()


@pytest.mark.parametrize("name", YAMLS)
def test_parses_and_opens_with_its_command(name):
    docs = list(yaml.safe_load_all(_text(name)))
    assert docs and all(isinstance(d, dict) and d for d in docs)
    header = re.match(r"(?:#.*\n)+", _text(name))
    assert header, f"{name}: starts with a comment saying what it is and how to use it"
    assert HEADER_COMMANDS[name] in header.group(0)


# --- Ray cluster launcher (aws.yaml, gcp.yaml) ------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_passes_rays_schema_and_validation(name):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert schema_path.is_file(), "the installed ray ships its launcher schema"
    raw = _load(name)
    jsonschema.validate(raw, json.loads(schema_path.read_text()))
    # What `ray up` runs before its first cloud call: merge provider defaults, then validate.
    validate_config(prepare_config(copy.deepcopy(raw)))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_gpu_workers_scale_from_zero(name):
    cfg = _load(name)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert _gpus(types[cfg["head_node_type"]]) == 0, "GPUs belong to autoscaled workers, not the head"
    gpu_types = {k: v for k, v in types.items() if _gpus(v) > 0}
    assert len(gpu_types) >= 2
    for key, t in gpu_types.items():
        assert t["min_workers"] == 0, f"{name}: {key} must scale from 0"
        assert 1 <= t["max_workers"] <= cfg["max_workers"]
    assert cfg["idle_timeout_minutes"] > 0


def test_gcp_gpu_types_attach_their_gpus():
    types = _load("gcp.yaml")["available_node_types"]
    for key, t in types.items():
        # Node type names become GCP instance labels: lower case, digits, '_' and '-' only.
        assert re.fullmatch(r"[a-z0-9_-]+", key), key
        if _gpus(t):
            node = t["node_config"]
            assert sum(a["acceleratorCount"] for a in node["guestAccelerators"]) == _gpus(t), key
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE", key


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_keeps_token_auth_on(name):
    cfg = _load(name)
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+?);", cmd).group(1)
        # The token file is mounted on every node from the client's default token location.
        assert cfg["file_mounts"][token_path] == "~/.ray/auth_token"
    assert "--dashboard-host=0.0.0.0" not in cfg["head_start_ray_commands"][-1], "reach it over SSH"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_torch_then_this_package_at_pyproject_version(name):
    cfg = _load(name)
    setup = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c)
    pkg_at = next(i for i, c in enumerate(setup) if "tclora" in c)
    assert torch_at < pkg_at, "torch first, so pip does not pick its own build while resolving tclora"
    wheel = re.search(r"([^\s\"']+)/tclora-([^-]+)-py3-none-any\.whl", setup[pkg_at])
    assert wheel.group(2) == VERSION
    assert wheel.group(1) in cfg["file_mounts"], "the wheel's directory is synced to every node"


# --- KubeRay ----------------------------------------------------------------------------------------


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert Version(spec["rayVersion"]) >= Version("2.52"), "token auth needs Ray >= 2.52"
    # Token auth: the operator-managed Secret (authOptions), or RAY_AUTH_MODE=token in every container.
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    if spec.get("authOptions", {}).get("mode") != "token":
        for c in (c for g in groups for c in _containers(g)):
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in c.get("env", []), c["name"]
    assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)
    assert _containers(spec["headGroupSpec"])[0]["image"]
    assert spec["workerGroupSpecs"]
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert g["minReplicas"] == 0, f"{g['groupName']} must scale from 0"
        assert 0 <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] >= 1
        res = _containers(g)[0]["resources"]
        # Kubernetes rejects a GPU request that differs from its limit.
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1
        assert res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == res["limits"]["nvidia.com/gpu"]


def test_raycluster_manifest():
    doc = _load("kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_rayjob_manifest_runs_a_real_config():
    from ray.runtime_env import RuntimeEnv

    from tclora.config import load_config

    doc = _load("kuberay/rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"])
    # The entrypoint names a config in this repository, and its --set keys exist in the schema.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["tclora", "run"]
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    load_config(ROOT / config, overrides)
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))


def test_rayjob_cluster_matches_raycluster():
    standalone = _load("kuberay/raycluster.yaml")["spec"]
    in_job = _load("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]
    assert in_job["rayVersion"] == standalone["rayVersion"]
    pick = lambda s: [(g.get("groupName"), [c["image"] for c in _containers(g)], g.get("maxReplicas"))  # noqa: E731
                      for g in [s["headGroupSpec"], *s["workerGroupSpecs"]]]
    assert pick(in_job) == pick(standalone)


# --- runtime_env and versions across every file -----------------------------------------------------


@pytest.mark.parametrize("name", ["runtime_env.yaml", "kuberay/runtime_env.yaml"])
def test_runtime_env_is_valid_and_holds_no_secret(name):
    from ray.runtime_env import RuntimeEnv

    env = _load(name)
    RuntimeEnv(**env)
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert env["env_vars"]["HF_HUB_OFFLINE"] in ("0", "1") and env["env_vars"]["HF_HOME"]
    secrets = [k for k in env["env_vars"] if re.search(r"TOKEN|SECRET|KEY", k) and k != "TOKENIZERS_PARALLELISM"]
    assert not secrets, f"the runtime env is stored and shown by the cluster: {secrets}"


def test_kuberay_runtime_env_is_the_default_one_plus_pip():
    """The VM nodes have torch and tclora from set-up (no per-job virtualenv; the launcher tests check their
    setup_commands); the stock KubeRay image gets them from the pip list, torch first, both pinned."""
    default, kuberay = _load("runtime_env.yaml"), _load("kuberay/runtime_env.yaml")
    assert "pip" not in default
    assert kuberay.pop("pip") == [f"torch=={TORCH_PIN}", f"tclora=={VERSION}"]
    assert kuberay == default


def test_ray_versions_agree_with_pyproject_and_this_client():
    import ray

    found = []
    for name in YAMLS:
        text = _text(name)
        found += [("image", name, v) for v in re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text)]
        found += [("pin", name, v) for v in re.findall(r"\bray(?:\[[^\]]*\])?==(\d+\.\d+\.\d+)", text)]
        found += [("rayVersion", name, v) for v in re.findall(r"rayVersion:\s*\"?(\d+\.\d+\.\d+)", text)]
    assert {kind for kind, _, _ in found} == {"image", "pin", "rayVersion"}
    versions = {v for _, _, v in found}
    assert len(versions) == 1, f"every image, pin and rayVersion must name one Ray: {found}"
    (version,) = versions
    assert DEPS["ray"].contains(version), f"pyproject wants ray{DEPS['ray']}"
    # `ray up` / `ray job submit` from this venv must match the cluster's Ray.
    assert version == ray.__version__, f"cluster_configs pin Ray {version}, this client runs {ray.__version__}"


def test_torch_and_package_pins_agree_with_pyproject_and_makefile():
    torch_pins, pkg_pins = [], []
    for name in YAMLS:
        text = _text(name)
        torch_pins += re.findall(r"\btorch==([\w.+]+)", text)
        pkg_pins += re.findall(r"\btclora==([\w.]+)", text)
        pkg_pins += re.findall(r"\btclora-([\w.]+)-py3-none-any\.whl", text)
        pkg_pins += re.findall(r"tclora/archive/refs/tags/v([\w.]+)\.zip", text)
    assert torch_pins and set(torch_pins) == {TORCH_PIN}, f"Makefile pins torch=={TORCH_PIN}: {torch_pins}"
    assert DEPS["torch"].contains(TORCH_PIN)
    assert pkg_pins and set(pkg_pins) == {VERSION}, f"pyproject is at {VERSION}: {pkg_pins}"
    for name in ("aws.yaml", "gcp.yaml", "kuberay/runtime_env.yaml", "kuberay/rayjob.yaml"):
        assert VERSION in _text(name), f"{name} installs tclora without pinning {VERSION}"
