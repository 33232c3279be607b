"""The CPU image, built and run: `scripts/build-image.sh cpu` (what `make image` runs) builds
deploy/docker/Dockerfile.cpu with buildah (on a base made from Debian's packages where no registry
is reachable), then the image's entrypoint serves on loopback ports in a `buildah run` container
(chroot isolation: the host's network), the README's Python client trains a step over gRPC and the
official Tinker SDK over HTTP, /metrics counts both, and SIGTERM drains. The image runs as its
non-root user and holds no compiler, no pip cache and no CUDA build of torch; the Kubernetes
manifests name the tag the build gives, and the CUDA Dockerfile takes every step the CPU one does.

Outside CI the build and run are skipped, with the reason, where buildah or debootstrap cannot run;
with CI=true they fail instead.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from server_process import READY
from test_deploy import DOCKERFILES, OVERLAYS, dockerfile, env_of, render, the_container, workloads

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "scripts" / "build-image.sh"
SDK_LOOP = Path(__file__).with_name("tinker_sdk_loop.py")
README = (ROOT / "README.md").read_text()
USER = "10001:10001"  # the Dockerfile's USER; the manifests' runAsUser (tests/test_deploy.py)
SIZE_BUDGET = 1_600_000_000  # bytes, uncompressed: torch's CPU wheel, no build tools (BENCHMARKS.md)
COMPILERS = ("cc", "gcc", "c++", "g++", "clang", "x86_64-linux-gnu-gcc", "ld")


def tag_of(variant: str) -> str:
    done = subprocess.run(["bash", str(BUILD), "--tag", variant], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def buildah(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"buildah {' '.join(args)}:\n{done.stderr}"
    return done.stdout.strip()


def cannot_run(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the image must be built)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> str:
    """The CPU image's ID, built by the script `make image` runs (the ID, not the tag, which a
    concurrent build may move)."""
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None:
            cannot_run(f"{tool} is not installed (`make test-tools` installs it)")
    if os.geteuid() != 0:
        cannot_run("debootstrap and buildah's chroot isolation need root")
    probe = subprocess.run(["buildah", "from", "--quiet", "scratch"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        cannot_run(f"buildah cannot make a container here: {probe.stderr.strip()}")
    buildah("rm", probe.stdout.strip())
    done = subprocess.run(
        ["bash", str(BUILD), "cpu"],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert done.returncode == 0, f"the image build failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    built, tag, image_id = done.stdout.strip().splitlines()[-1].rsplit(" ", 2)
    assert built == "image: built" and tag == tag_of("cpu")
    return image_id


@pytest.fixture
def container(image):
    name = buildah("from", "--quiet", image)
    try:
        yield name
    finally:
        buildah("rm", name)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Served:
    """The image's entrypoint in `buildah run`, on free loopback ports read from its ready line."""

    def __init__(self, container: str, entrypoint: list[str]):
        flags = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0"]
        self.proc = subprocess.Popen(
            ["buildah", "run", "--isolation", "chroot", container, "--", *entrypoint, *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.ports: tuple[int, int, int] | None = None
        threading.Thread(target=self._pump, daemon=True).start()
        if not self.ready.wait(180) or self.ports is None:
            self.kill()
            raise AssertionError("the server in the image did not start:\n" + self.log())

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if (m := READY.search(line)) and m.group(3):
                self.ports = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
                self.ready.set()
        self.ready.set()

    def log(self) -> str:
        return "".join(self.lines)

    def server_pid(self) -> int:
        """The server itself: `buildah run` answers a signal by killing its command, whereas a
        container runtime sends it to the entrypoint, so signals go to this process."""
        (pid,) = [
            p for p in descendants(self.proc.pid) if Path(f"/proc/{p}/comm").read_text().strip() == "cispo-server"
        ]
        return pid

    def kill(self) -> None:
        """SIGKILL to `buildah run` would leave its command running: the command first."""
        for pid in reversed(descendants(self.proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(30)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a fresh build included
def test_image_serves_grpc_and_the_tinker_sdk_and_drains(image, container):
    config = json.loads(buildah("inspect", "--type", "image", image))["OCIv1"]["config"]
    served = Served(container, config["Entrypoint"])
    try:
        grpc_port, metrics_port, http_port = served.ports
        pid = served.server_pid()
        status = Path(f"/proc/{pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
        gid = re.search(r"^Gid:\s+(\d+)", status, re.M).group(1)
        assert f"{uid}:{gid}" == USER == config["User"]

        # The SDK's whole loop: LoRA training, save_state (the non-root user writes the image's
        # checkpoint directory), sampling, an export and a refused datum. Its runs end with its
        # session, so the README client's full-model run may follow.
        env = {
            **os.environ,
            "TINKER_BASE_URL": f"http://127.0.0.1:{http_port}",
            "TINKER_API_KEY": "tml-image-test",
            "TINKER_TELEMETRY": "0",
        }
        run = subprocess.run(
            [sys.executable, str(SDK_LOOP), "loop", ""], env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:] + served.log()
        sdk = json.loads(run.stdout.strip().splitlines()[-1])
        assert len(sdk["loss"]) == len(sdk["grad_norm"]) == 2 and sdk["error"]["type"] == "BadRequestError"
        assert len(sdk["samples"]) == 2 and sdk["state_path"].startswith("tinker://")

        readme_client = re.search(r"```python\n(.*?)```", README, re.S).group(1)
        run = subprocess.run(
            [sys.executable, "-c", readme_client.replace("localhost:50051", f"127.0.0.1:{grpc_port}")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr + served.log()
        loss, *_, grad_norm = run.stdout.split()
        float(loss), float(grad_norm)

        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
        assert metrics.status_code == 200
        samples = [s for family in text_string_to_metric_families(metrics.text) for s in family.samples]

        def total(name: str, **labels: str) -> float:
            return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

        assert total("cispo_optim_steps_total") >= 1  # the README client's run (the SDK's ended with their series)
        assert total("cispo_sampled_sequences_total") >= 4  # the SDK loop's two samples of two
        assert total("cispo_http_requests_total", status="200") > 0
        assert total("cispo_http_requests_total", status="400") >= 1  # the refused datum
        assert total("grpc_server_started_total", grpc_service="cispo.v1.TrainingService") > 0

        os.kill(pid, signal.SIGTERM)
        assert served.proc.wait(120) == 0, served.log()
        assert "drained" in served.log()
    finally:
        if served.proc.poll() is None:
            served.kill()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_image_is_lean_and_unprivileged(image, container):
    info = json.loads(buildah("inspect", "--type", "image", image))
    size = sum(layer["size"] for layer in json.loads(info["Manifest"])["layers"])
    assert size <= SIZE_BUDGET, f"{image} is {size / 1e9:.2f} GB, over its budget of {SIZE_BUDGET / 1e9:.2f} GB"
    assert info["OCIv1"]["config"]["User"] == USER

    root = Path(buildah("mount", container))
    try:
        path = next(e.split("=", 1)[1] for e in info["OCIv1"]["config"]["Env"] if e.startswith("PATH="))
        bin_dirs = [root / d.lstrip("/") for d in path.split(":")]
        found = [str(d / c) for d in bin_dirs for c in COMPILERS if (d / c).exists()]
        assert not found, f"build tools left in the image: {found}"
        caches = [str(p) for home in ("root", "var/lib/cispo") for p in (root / home).glob(".cache/pip")]
        assert not caches, f"pip's cache left in the image: {caches}"
        assert not (root / "src").exists(), "the build's sources are left in the image"
        assert not (root / "etc" / "pip.conf").exists(), "the build's pip settings are left in the image"
        assert not any((root / "mnt").iterdir()), "the build's pip volume is left in the image"
        checkpoints = root / "var" / "lib" / "cispo" / "checkpoints"
        assert f"{checkpoints.stat().st_uid}:{checkpoints.stat().st_gid}" == USER
    finally:
        buildah("umount", container)

    # torch's CPU build: no CUDA runtime wheels beside it.
    probe = (
        "import importlib.metadata as m, torch; "
        "print(torch.version.cuda, sorted(d.name for d in m.distributions() if d.name.startswith('nvidia')))"
    )
    out = buildah("run", "--isolation", "chroot", container, "--", "python", "-c", probe, timeout=120)
    assert out == "None []", out


def test_manifests_reference_the_built_tags():
    tags = {variant: tag_of(variant) for variant in DOCKERFILES}
    for name in OVERLAYS:
        docs = render(name)
        for workload in workloads(docs):
            container = the_container(workload)
            variant = env_of(container, docs)["CISPO_DEVICE"]
            assert container["image"] == tags[variant], f"{name}: {container['image']}; the build makes {tags[variant]}"


def test_cuda_dockerfile_takes_the_cpu_steps():
    """The two differ only in torch's index, the device and the NVIDIA runtime's variables."""

    def steps(variant: str) -> list[tuple[str, str]]:
        out = []
        for instruction, rest in dockerfile(DOCKERFILES[variant]):
            if instruction == "ARG" and rest.startswith("TORCH_INDEX_URL="):
                rest = "TORCH_INDEX_URL=<index>"
            if instruction == "ENV":
                rest = " ".join(kv for kv in rest.split() if not kv.startswith(("CISPO_DEVICE=", "NVIDIA_")))
            out.append((instruction, rest))
        return out

    assert steps("cuda") == steps("cpu")
