"""The Python packages verl 0.9.1 needs on the GPU machine, as one xz archive that travels in one `run` call.

The GPU image has torch, transformers, pandas, pyarrow, aiohttp, grpcio, psutil, ... (KINDS.md's list) but
not ray, verl, hydra, tensordict, TransferQueue (verl's v1 trainer), fastapi (parity's server) and friends.
`build` downloads those as CPython 3.12 manylinux wheels, installs them here into a scratch site (pip
--target for Python 3.12, nothing runs), drops what a single-node verl run never loads (Ray's Java jar,
31 MB of its 76 MB wheel, and the dashboard's web build: the dashboard does not start without ray[default]'s
extras, which the image lacks), packs the site with xz and splits it into parts of at most --part-mib.
`check` (here, Python 3.11) imports verl's PPO path, parity's backend and the recipe's reward with every
third-party module blocked that is neither on the GPU image's list nor in the archive, so a hard import
that the archive misses fails here, not on the device. `ray-smoke` unpacks the archive itself and starts
a local Ray cluster from it with a CPython 3.12 that has only Ray's imports from the image's list (the
stripped Ray wheel runs, runtime-env variables reach an actor).

    python tools/verl_wheels.py build            # .whl/verl_dl (downloads), .whl/verl1/site.tar.xz.part* + sha256
    python tools/verl_wheels.py check            # the import census
    python tools/verl_wheels.py ray-smoke        # Python 3.12: Ray from the archive runs a local cluster
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = Path("/work/.library/device/KINDS.md")

# (distribution==version) for CPython 3.12 x86_64; one version of each
WHEELS = [
    # verl and what it imports at start (its Requires-Dist, less what the image has)
    "verl==0.9.1", "hydra-core==1.3.8", "omegaconf==2.3.1", "tensordict==0.10.0", "pyvers==0.2.3", "orjson==3.13.0",
    "codetiming==1.4.0", "pylatexenc==2.11", "torchdata==0.11.0", "cachetools==8.0.2",
    "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
    # verl's v1 trainer (trainer.use_v1, the default) keeps batches in TransferQueue
    "transferqueue==0.1.11", "pyzmq==27.3.0", "msgspec==0.23.0",
    # ray core (ray[default]'s extras only start the dashboard and metrics agent)
    "ray==2.60.0", "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0",
    "rpds-py==2026.9.1",
    # parity's OpenAI server (the address verl hands its chat clients) and the GGUF reader for the HF export
    "fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.54.0", "pydantic==2.13.4", "pydantic-core==2.46.4",
    "annotated-types==0.7.0", "typing-inspection==0.4.2", "sniffio==1.3.1", "httpx2==2.16.2", "httpcore2==2.16.2",
    "truststore==0.10.5", "opentelemetry-api==1.45.2", "gguf==0.19.0",
]
# only published as a source distribution (pure Python): built into a wheel here
SDISTS = ["antlr4-python3-runtime==4.9.3"]
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64"]
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
          *[arg for p in PLATFORMS for arg in ("--platform", p)]]
# never loaded by a one-node run: Ray's Java workers and dashboard web app; TransferQueue's wheel also
# ships top-level `tests`, `scripts`, `recipe`, `tutorial` packages that would shadow others on PYTHONPATH
DROPPED = ["ray/jars", "ray/dashboard/client/build", "bin", "tests", "scripts", "recipe", "tutorial"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def build(dest: Path, part_mib: int) -> None:
    downloads = dest / "verl_dl"
    downloads.mkdir(parents=True, exist_ok=True)
    pip("download", "-q", "--no-deps", *TARGET, "-d", str(downloads), *WHEELS)
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, *SDISTS)
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(downloads), *Path(tmp).glob("*.tar.gz"))
    wanted = {normalize(spec.split("==")[0]): spec.split("==")[1] for spec in WHEELS + SDISTS}
    wheels = []
    for wheel in sorted(downloads.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if wanted.get(normalize(name)) == version:
            wheels.append(wheel)
    missing = set(wanted) - {normalize(w.name.split("-")[0]) for w in wheels}
    if missing:
        raise SystemExit(f"no wheel downloaded for {sorted(missing)}")
    out = dest / "verl1"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        pip("install", "-q", "--no-deps", "--no-compile", "--no-index", *TARGET, "--target", str(site),
            *map(str, wheels))
        for rel in DROPPED:
            shutil.rmtree(site / rel, ignore_errors=True)
        archive = Path(tmp) / "site.tar.xz"
        with tarfile.open(archive, "w:xz", preset=9) as tar:
            tar.add(site, arcname=".")
        data = archive.read_bytes()
    step = part_mib << 20
    for i in range(0, len(data), step):
        (out / f"site.tar.xz.part{i // step}").write_bytes(data[i:i + step])
    (out / "site.tar.xz.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    (out / "wheels.txt").write_text("".join(w.name + "\n" for w in wheels))
    print(f"{len(wheels)} wheels -> {out}: {len(data) / 2**20:.1f} MiB xz in {(len(data) + step - 1) // step} part(s)")


def device_distributions() -> set[str]:
    """The GPU image's packages, from KINDS.md's 'Python packages already there'."""
    text = KINDS.read_text()
    listing = text.split("## Python packages already there", 1)[1].split("Packages:", 1)[1].split("\n", 1)[0]
    return {normalize(n.strip()) for n in listing.strip().rstrip(".").split(",")}


# what the trainer process and verl's Ray workers import on a GRPO run with rollout.name=parity
MODULES = ["verl", "verl.trainer.main_ppo", "verl.trainer.ppo.v1.trainer_sync", "verl.trainer.ppo.v1.agent_loop_tq",
           "verl.workers.engine_workers", "verl.workers.engine.fsdp.transformer_impl",
           "verl.experimental.agent_loop.single_turn_agent_loop", "verl.experimental.reward_loop",
           "verl.utils.dataset.rl_dataset", "verl.workers.reward_manager", "verl.checkpoint_engine",
           "verl.utils.tracking", "transfer_queue", "parity.integrations.verl", "parity.models.gguf",
           "parity.train.tasks", "ray.util.scheduling_strategies", "ray._private.workers.default_worker"]
CENSUS = """
import importlib, sys
failed = {}
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
    except Exception as e:  # every module is reported, not the first failure
        failed[module] = f"{type(e).__name__}: {e}"
from verl.workers.rollout.base import _ROLLOUT_REGISTRY
if ("parity", "async") not in _ROLLOUT_REGISTRY:
    failed["verl.plugins entry point"] = "('parity', 'async') not registered"
if not failed:  # Ray without ray[default]'s extras: a local cluster, env vars through a runtime env, an actor
    import os, ray
    os.environ["PARITY_CHECK_DRIVER"] = "inherited"
    ray.init(num_cpus=1, log_to_driver=False, runtime_env={"env_vars": {"PARITY_CHECK_RUNTIME": "runtime_env"}})
    seen = ray.get(ray.remote(lambda: (os.environ.get("PARITY_CHECK_DRIVER"), os.environ.get("PARITY_CHECK_RUNTIME")))
                   .remote(), timeout=120)
    ray.shutdown()
    if seen != ("inherited", "runtime_env"):
        failed["ray worker environment"] = f"driver and runtime_env variables seen as {seen}"
for module, error in failed.items():
    print(f"FAILED {module}: {error}")
print("ok: every module imports with only the GPU image's packages and the archive's; Ray ran an actor" if not failed else "")
sys.exit(1 if failed else 0)
"""


def device_like_site(allowed: set[str], site: Path, search: list[str]) -> list[str]:
    """Link into `site` the installed distributions that the device has too (files and metadata, so
    transformers' and verl's availability checks answer as there); returns the allowed names not found."""
    from importlib.metadata import distributions

    found = set()
    for dist in distributions(path=search):
        name = normalize(dist.metadata["Name"])
        if name not in allowed or name in found:
            continue
        found.add(name)
        root = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or []}
        for top in tops:
            if top != ".." and (root / top).exists() and not (site / top).exists():
                (site / top).symlink_to(root / top)
    return sorted(allowed - found)


def requirements(dest: Path, allowed_image: set[str], archive: set[str]) -> list[str]:
    """verl's and ray[default]'s Requires-Dist (for Python 3.12, no other extras), each marked as in the
    archive, on the image, or on neither (then only an import census can tell whether it is needed)."""
    from packaging.requirements import Requirement

    rows = []
    for wheel, extras in (("verl-0.9.1-*.whl", set()), ("ray-2.60.0-*.whl", {"default"})):
        (path,) = (dest / "verl_dl").glob(wheel)
        with zipfile.ZipFile(path) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in meta.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            env = {"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux"}
            if req.marker and not any(req.marker.evaluate(env | {"extra": e}) for e in extras | {""}):
                continue
            name = normalize(req.name)
            where = "archive" if name in archive else "image" if name in allowed_image else "NEITHER"
            rows.append(f"{path.name.split('-')[0]:5} {where:8} {req}")
    return sorted(set(rows))


def check(dest: Path, local_site: Path) -> int:
    """Import MODULES in a fresh interpreter that sees only the stdlib, the device's distributions as
    installed here, the archive's (Python 3.11 builds of the same pins, under `local_site`) and parity."""
    listed = [w.split("-")[:2] for w in (dest / "verl1" / "wheels.txt").read_text().split()]
    search = [p for p in sys.path if p.endswith("site-packages")]
    from importlib.metadata import distributions

    here = {normalize(d.metadata["Name"]) for d in distributions(path=[str(local_site)])}
    need = [f"{name}=={version}" for name, version in listed if normalize(name) not in here]
    if need:
        pip("install", "-q", "--no-deps", "--target", str(local_site), *need)
    allowed = device_distributions() | {normalize(name) for name, _ in listed} | {"parity"}  # its entry point
    print("\n".join(requirements(dest, device_distributions(), {normalize(name) for name, _ in listed})))
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        device_like_site(allowed, site, [str(local_site), *search])
        env = {"PYTHONPATH": f"{site}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": tmp, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-S", "-c", CENSUS, *MODULES], env=env).returncode


# Ray's own imports that the GPU image provides (KINDS.md's list), for `ray-smoke` on a bare Python 3.12
RAY_IMAGE_DEPS = ["click", "filelock", "msgpack", "protobuf", "pyyaml", "requests", "packaging", "psutil", "attrs",
                  "typing-extensions", "anyio", "h11", "annotated-doc"]
RAY_SMOKE = """
import os, sys, ray
os.environ["PARITY_CHECK_DRIVER"] = "inherited"
ray.init(num_cpus=1, log_to_driver=False, runtime_env={"env_vars": {"PARITY_CHECK_RUNTIME": "runtime_env"}})
env = ray.remote(lambda: (os.environ.get("PARITY_CHECK_DRIVER"), os.environ.get("PARITY_CHECK_RUNTIME"), ray.__file__))
driver, runtime, where = ray.get(env.remote(), timeout=120)
ray.shutdown()
ok = (driver, runtime) == ("inherited", "runtime_env") and where.startswith(sys.argv[1])
print(f"ray {ray.__version__} from {where}, Python {sys.version.split()[0]}: actor saw {driver!r}, {runtime!r}",
      "ok" if ok else "FAILED")
sys.exit(0 if ok else 1)
"""


def ray_smoke(dest: Path, python: str, deps_site: Path) -> int:
    """The archive itself (CPython 3.12 binaries) unpacked as on the device; a local Ray cluster started
    from it by `python` runs an actor that sees the driver's and the runtime env's variables."""
    install = [python, "-m", "pip", "install", "-q", "--target", str(deps_site), *RAY_IMAGE_DEPS]
    if not deps_site.exists():
        subprocess.run(install, check=True)
    parts = sorted((dest / "verl1").glob("site.tar.xz.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    data = b"".join(p.read_bytes() for p in parts)
    if hashlib.sha256(data).hexdigest() != (dest / "verl1" / "site.tar.xz.sha256").read_text().strip():
        raise SystemExit("archive sha256 mismatch")
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        (Path(tmp) / "site.tar.xz").write_bytes(data)
        with tarfile.open(Path(tmp) / "site.tar.xz") as tar:
            tar.extractall(site, filter="tar")
        env = {"PYTHONPATH": f"{site}:{deps_site}", "PATH": "/usr/bin:/bin", "HOME": tmp}
        return subprocess.run([python, "-s", "-c", RAY_SMOKE, str(site)], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["build", "check", "ray-smoke"])
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    parser.add_argument("--local-site", type=Path, default=Path("/tmp/verl_site311"),
                        help="check: where the archive's pins are installed for this Python")
    parser.add_argument("--python", default="python3.12", help="ray-smoke: a CPython 3.12 interpreter")
    parser.add_argument("--deps-site", type=Path, default=Path("/tmp/verl_py312_deps"),
                        help="ray-smoke: where Ray's imports that the image has are installed for --python")
    parser.add_argument("--part-mib", type=int, default=50, help="largest part (a call carries 64 MiB in all)")
    args = parser.parse_args(argv)
    if args.part_mib < 1:
        parser.error(f"--part-mib must be >= 1, got {args.part_mib}")
    if args.stage == "build":
        build(args.dest, args.part_mib)
        return 0
    if args.stage == "ray-smoke":
        return ray_smoke(args.dest, args.python, args.deps_site)
    return check(args.dest, args.local_site)


if __name__ == "__main__":
    raise SystemExit(main())
