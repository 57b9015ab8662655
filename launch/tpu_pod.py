#!/usr/bin/env python3
"""Cloud TPU pod launcher: create the slice, install warm-jax on every host, run the SAME
command on all hosts (jax.distributed finds its peers), collect the logs, delete the slice.

    python launch/tpu_pod.py --name warm-v4 --zone us-central2-b --accelerator_type v4-32 \\
        --run_dir gs://MY_BUCKET/runs/warm_v4 --gin_file gin/runs/warm_mini.gin \\
        --gin.NUM_MEMBERS=8 --delete

Steps (--steps picks a subset, in this order):
  create   `gcloud compute tpus tpu-vm create` (or, with --queued, a queued resource that is
           polled until ACTIVE); --spot asks for spot capacity.
  ship     the code on every worker: `git clone` of --repo (at --branch), or, by default, a
           tarball of this checkout's tracked + untracked-not-ignored files, copied with
           `gcloud compute tpus tpu-vm scp --worker=all`.
  setup    `bash launch/setup_env.sh` on every worker (creates .venv from the pinned lock,
           with --python, installed with apt if missing), then `jax[tpu]` at the locked jax
           version; with a gs:// run directory, gcsfuse is installed too.
  run      on every worker (`--worker=all`): WARM_JAX_DISTRIBUTED=auto
           python -m warm_jax.main --gin_file=RUN.gin --gin_file=MESH.gin --gin.RUN_DIR=...
           plus your --gin.NAME=VALUE bindings, identical on every host. A gs:// run
           directory is mounted with gcsfuse at the same path on every host (the stages
           use plain file I/O). Each worker also keeps its own log (~/warm_jax_logs/run.log).
  logs     copies every worker's log to --log_dir/worker_N.log.
  delete   deletes the slice (or the queued resource). With --delete it also runs when an
           earlier step failed, so a failed run does not keep a pod.

--dry-run prints every command (one per line, shell-quoted) instead of running it.
Commands are argument lists run with subprocess (no local shell); the one remote command
string is assembled with shlex.quote.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("create", "ship", "setup", "run", "logs", "delete")
REMOTE_DIR = "warm-jax"  # under the remote home directory
REMOTE_LOG_DIR = "warm_jax_logs"
GCS_MOUNT_ROOT = "/tmp/warm_jax_gcs"

# accelerator generation -> (default runtime version, chips or cores per host, unit)
_GENERATIONS = {
    "v4": ("tpu-ubuntu2204-base", 8, "cores"),  # v4-N: N TensorCores, 4 chips x 2 per host
    "v5p": ("v2-alpha-tpuv5", 8, "cores"),  # v5p-N: N TensorCores, 4 chips x 2 per host
    "v5litepod": ("v2-alpha-tpuv5-lite", 4, "chips"),  # multi-host v5e: 4 chips per host
    "v6e": ("v2-alpha-tpuv6e", 4, "chips"),  # multi-host v6e: 4 chips per host
}
_SINGLE_HOST_MAX = {"v4": 8, "v5p": 8, "v5litepod": 8, "v6e": 8}
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_ACCEL_RE = re.compile(r"^(v4|v5p|v5litepod|v6e)-([0-9]+)$")


class LaunchError(RuntimeError):
    pass


def parse_accelerator(accelerator_type: str) -> tuple[str, int]:
    m = _ACCEL_RE.match(accelerator_type or "")
    if not m:
        raise LaunchError(
            f"--accelerator_type {accelerator_type!r}: expected GENERATION-SIZE with generation "
            f"in {sorted(_GENERATIONS)}, e.g. v4-32, v5litepod-16, v5p-64, v6e-16")
    return m.group(1), int(m.group(2))


def num_hosts(accelerator_type: str) -> int:
    """Hosts (TPU VM workers) of a slice, e.g. v4-32 -> 4, v5litepod-16 -> 4, v6e-16 -> 4."""
    gen, size = parse_accelerator(accelerator_type)
    if size <= _SINGLE_HOST_MAX[gen]:
        return 1
    per_host = _GENERATIONS[gen][1]
    if size % per_host:
        raise LaunchError(f"--accelerator_type {accelerator_type}: {size} {_GENERATIONS[gen][2]} "
                          f"is not a multiple of {per_host} per host")
    return size // per_host


def default_runtime(accelerator_type: str) -> str:
    return _GENERATIONS[parse_accelerator(accelerator_type)[0]][0]


def default_mesh_gin(accelerator_type: str) -> Optional[str]:
    """gin/mesh/tpu_<gen>_<size>.gin when it exists (v5litepod is spelled v5e)."""
    gen, size = parse_accelerator(accelerator_type)
    path = os.path.join("gin", "mesh", f"tpu_{gen.replace('v5litepod', 'v5e')}_{size}.gin")
    return path if os.path.exists(os.path.join(ROOT, path)) else None


def locked_version(package: str, lock: str = os.path.join(ROOT, "requirements.lock")) -> str:
    with open(lock) as f:
        for line in f:
            name, sep, version = line.strip().partition("==")
            if sep and name.lower() == package:
                return version.split(";")[0].strip()
    raise LaunchError(f"{lock}: no pinned '{package}==' line")


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="launch/tpu_pod.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="TPU VM (node) name")
    ap.add_argument("--zone", required=True, help="e.g. us-central2-b")
    ap.add_argument("--accelerator_type", required=True,
                    help="v4-8, v4-32, v5litepod-16, v5p-64, v6e-16, ...")
    ap.add_argument("--runtime_version", default=None,
                    help="TPU software version (default by generation, e.g. "
                         "tpu-ubuntu2204-base for v4, v2-alpha-tpuv6e for v6e)")
    ap.add_argument("--project", default=None, help="gcloud project (default: gcloud config)")
    ap.add_argument("--queued", action="store_true", help="create through a queued resource")
    ap.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    ap.add_argument("--queued_timeout_s", type=float, default=3600,
                    help="how long to wait for a queued resource to become ACTIVE")
    ap.add_argument("--repo", default=None,
                    help="git URL to clone on every worker (default: copy this checkout)")
    ap.add_argument("--branch", default="main")
    ap.add_argument("--python", default="python3.11", help="interpreter for the .venv")
    ap.add_argument("--gin_file", action="append", default=[],
                    help="run gin file(s), relative to the repository (repeatable)")
    ap.add_argument("--mesh_gin", default=None,
                    help="mesh preset (default gin/mesh/tpu_<gen>_<size>.gin when it exists; "
                         "'none' for none)")
    ap.add_argument("--run_dir", default=None, help="run directory, normally gs://BUCKET/PATH")
    ap.add_argument("--stages", default="", help="passed to warm_jax.main --stages")
    ap.add_argument("--log_dir", default="tpu_logs", help="local directory for worker logs")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--delete", action="store_true",
                    help="delete the slice at the end (also after a failure)")
    ap.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                    help="print the commands instead of running them")
    args, rest = ap.parse_known_args(argv)
    bindings = []
    for r in rest:
        if r.startswith("--gin.") and "=" in r:
            bindings.append(r)
        else:
            ap.error(f"unrecognised argument {r!r} (gin bindings are --gin.NAME=VALUE)")
    try:
        validate(args, bindings)
    except LaunchError as e:
        ap.error(str(e))
    return args, bindings


def validate(args: argparse.Namespace, bindings: list[str]) -> None:
    if not _NAME_RE.match(args.name):
        raise LaunchError(f"--name {args.name!r}: lowercase letters, digits and '-', starting "
                          "with a letter, at most 63 characters")
    if not _ZONE_RE.match(args.zone):
        raise LaunchError(f"--zone {args.zone!r}: expected a zone such as us-central2-b")
    parse_accelerator(args.accelerator_type)
    args.runtime_version = args.runtime_version or default_runtime(args.accelerator_type)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise LaunchError(f"--steps {args.steps!r}: choose from {','.join(STEPS)}")
    args.step_list = [s for s in STEPS if s in steps]
    if args.delete and "delete" not in args.step_list:
        args.step_list.append("delete")
    if not args.delete and "delete" in args.step_list and args.steps == ",".join(STEPS):
        args.step_list.remove("delete")  # the default runs everything but delete
    if "run" in args.step_list:
        if not args.gin_file:
            raise LaunchError("--gin_file is required to run (e.g. gin/runs/warm_mini.gin)")
        for g in args.gin_file:
            if os.path.isabs(g) or not os.path.exists(os.path.join(ROOT, g)):
                raise LaunchError(f"--gin_file {g!r}: not a file of this repository (give a "
                                  "path relative to its root, e.g. gin/runs/warm_mini.gin)")
        if not args.run_dir:
            raise LaunchError("--run_dir is required to run (gs://BUCKET/PATH on a pod)")
        if num_hosts(args.accelerator_type) > 1 and not args.run_dir.startswith("gs://"):
            raise LaunchError(f"--run_dir {args.run_dir!r}: a {args.accelerator_type} slice has "
                              f"{num_hosts(args.accelerator_type)} hosts, which need a shared "
                              "run directory: use gs://BUCKET/PATH")
        if any(b.startswith("--gin.RUN_DIR=") for b in bindings):
            raise LaunchError("give the run directory as --run_dir, not --gin.RUN_DIR")
    if args.mesh_gin is None:
        args.mesh_gin = default_mesh_gin(args.accelerator_type)
    elif args.mesh_gin == "none":
        args.mesh_gin = None
    elif not os.path.exists(os.path.join(ROOT, args.mesh_gin)):
        raise LaunchError(f"--mesh_gin {args.mesh_gin!r}: no such file in the repository")
    if args.run_dir and args.run_dir.startswith("gs://") and not re.match(
            r"^gs://[a-z0-9][-_.a-z0-9]{2,221}(/.*)?$", args.run_dir):
        raise LaunchError(f"--run_dir {args.run_dir!r}: not a valid gs://BUCKET/PATH")


# --------------------------------------------------------------------------- commands


def _gcloud(args: argparse.Namespace, *words: str) -> list[str]:
    cmd = ["gcloud", *words]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def queued_id(args) -> str:
    return f"{args.name}-qr"


def create_commands(args) -> list[list[str]]:
    if args.queued:
        cmd = _gcloud(args, "compute", "tpus", "queued-resources", "create", queued_id(args),
                      f"--node-id={args.name}", f"--zone={args.zone}",
                      f"--accelerator-type={args.accelerator_type}",
                      f"--runtime-version={args.runtime_version}")
        if args.spot:
            cmd.append("--spot")
        return [cmd]
    cmd = _gcloud(args, "compute", "tpus", "tpu-vm", "create", args.name, f"--zone={args.zone}",
                  f"--accelerator-type={args.accelerator_type}",
                  f"--version={args.runtime_version}")
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def queued_state_command(args) -> list[str]:
    return _gcloud(args, "compute", "tpus", "queued-resources", "describe", queued_id(args),
                   f"--zone={args.zone}", "--format=value(state.state)")


def ssh_command(args, remote: str, worker: str = "all") -> list[str]:
    return _gcloud(args, "compute", "tpus", "tpu-vm", "ssh", args.name, f"--zone={args.zone}",
                   f"--worker={worker}", f"--command={remote}")


def scp_command(args, src: str, dst: str, worker: str = "all") -> list[str]:
    return _gcloud(args, "compute", "tpus", "tpu-vm", "scp", src, dst, f"--zone={args.zone}",
                   f"--worker={worker}")


def ship_commands(args, tarball: str) -> list[list[str]]:
    q = shlex.quote
    if args.repo:
        remote = (f"if [ -d {REMOTE_DIR}/.git ]; then git -C {REMOTE_DIR} fetch -q origin "
                  f"{q(args.branch)} && git -C {REMOTE_DIR} checkout -q FETCH_HEAD; else "
                  f"git clone -q --depth 1 --branch {q(args.branch)} {q(args.repo)} "
                  f"{REMOTE_DIR}; fi")
        return [ssh_command(args, remote)]
    name = os.path.basename(tarball)
    return [scp_command(args, tarball, f"{args.name}:{name}"),
            ssh_command(args, f"mkdir -p {REMOTE_DIR} && tar -xzf {q(name)} -C {REMOTE_DIR} "
                              f"&& rm -f {q(name)}")]


GCSFUSE_INSTALL = (
    "(command -v gcsfuse >/dev/null || { "
    "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
    "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" "
    "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
    "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
    "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && "
    "sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; })")


def setup_command(args) -> list[str]:
    q = shlex.quote
    py = q(args.python)
    jax_version = locked_version("jax")
    parts = [
        f"cd {REMOTE_DIR}",
        f"(command -v {py} >/dev/null || (sudo apt-get update -qq && "
        f"sudo apt-get install -y -qq {py} {py}-venv))",
        f"PYTHON={py} bash launch/setup_env.sh",
        # libtpu for the locked jax version (setup_env.sh installs the CPU wheels)
        f".venv/bin/uv pip install -q --python .venv/bin/python "
        f"{q(f'jax[tpu]=={jax_version}')}",
        ".venv/bin/python -c 'import jax; print(jax.devices())'",
    ]
    if args.run_dir and args.run_dir.startswith("gs://"):
        parts.append(GCSFUSE_INSTALL)
    return ssh_command(args, " && ".join(parts))


def gcs_mount(run_dir: str) -> tuple[str, str, str]:
    """(bucket, mount point, the run directory's path under the mount)."""
    bucket, _, path = run_dir[len("gs://"):].partition("/")
    mount = f"{GCS_MOUNT_ROOT}/{bucket}"
    return bucket, mount, f"{mount}/{path}".rstrip("/")


def main_argv(args, bindings: Sequence[str], run_dir: str) -> list[str]:
    """The warm_jax.main command line, identical on every host."""
    argv = [".venv/bin/python", "-m", "warm_jax.main"]
    argv += [f"--gin_file={g}" for g in args.gin_file]
    if args.mesh_gin:
        argv.append(f"--gin_file={args.mesh_gin}")
    argv.append(f"--gin.RUN_DIR={run_dir!r}")
    argv += list(bindings)
    if args.stages:
        argv.append(f"--stages={args.stages}")
    return argv


def run_command(args, bindings: Sequence[str]) -> list[str]:
    q = shlex.quote
    parts = ["set -o pipefail", f"cd {REMOTE_DIR}", f"mkdir -p ~/{REMOTE_LOG_DIR}"]
    run_dir = args.run_dir
    if run_dir.startswith("gs://"):
        bucket, mount, run_dir = gcs_mount(run_dir)
        # directory renames (atomic exports, checkpoint commits) need --rename-dir-limit
        parts.append(f"mkdir -p {q(mount)} && (mountpoint -q {q(mount)} || gcsfuse "
                     f"--implicit-dirs --rename-dir-limit=1000000 {q(bucket)} {q(mount)})")
        parts.append(f"mkdir -p {q(run_dir)}")
    env = ["env", "WARM_JAX_DISTRIBUTED=auto", "TF_CPP_MIN_LOG_LEVEL=2", "PYTHONUNBUFFERED=1"]
    python = " ".join(q(a) for a in env + main_argv(args, bindings, run_dir))
    parts.append(f"{python} 2>&1 | tee ~/{REMOTE_LOG_DIR}/run.log")
    return ssh_command(args, " && ".join(parts))


def logs_commands(args) -> list[list[str]]:
    return [scp_command(args, f"{args.name}:~/{REMOTE_LOG_DIR}/run.log",
                        os.path.join(args.log_dir, f"worker_{w}.log"), worker=str(w))
            for w in range(num_hosts(args.accelerator_type))]


def delete_commands(args) -> list[list[str]]:
    if args.queued:
        return [_gcloud(args, "compute", "tpus", "queued-resources", "delete", queued_id(args),
                        f"--zone={args.zone}", "--force", "--quiet")]
    return [_gcloud(args, "compute", "tpus", "tpu-vm", "delete", args.name,
                    f"--zone={args.zone}", "--quiet")]


# --------------------------------------------------------------------------- execution


def make_tarball(out_dir: str) -> str:
    """This checkout's tracked and untracked-but-not-ignored files as a .tar.gz."""
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], check=True, capture_output=True).stdout
    path = os.path.join(out_dir, "warm_jax_src.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for rel in sorted(set(f for f in files.decode().split("\0") if f)):
            full = os.path.join(ROOT, rel)
            if os.path.isfile(full):
                tar.add(full, arcname=rel)
    return path


class Runner:
    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, cmd: list[str], *, capture: bool = False) -> str:
        print(shlex.join(cmd), flush=True)
        if self.dry_run:
            return ""
        proc = subprocess.run(cmd, text=True, capture_output=capture)
        if proc.returncode:
            raise LaunchError(f"command failed with exit code {proc.returncode}: "
                              f"{shlex.join(cmd)[:300]}"
                              + (f"\n{proc.stderr[-2000:]}" if capture else ""))
        return proc.stdout if capture else ""


def wait_queued(args, run: Runner) -> None:
    if run.dry_run:
        print("# poll until ACTIVE:", flush=True)
        run(queued_state_command(args), capture=True)
        return
    deadline = time.monotonic() + args.queued_timeout_s
    while True:
        state = run(queued_state_command(args), capture=True).strip()
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise LaunchError(f"queued resource {queued_id(args)} is {state}")
        if time.monotonic() > deadline:
            raise LaunchError(f"queued resource {queued_id(args)} not ACTIVE after "
                              f"{args.queued_timeout_s:g}s (state {state or 'unknown'})")
        time.sleep(30)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
    run = Runner(args.dry_run)
    print(f"# {args.accelerator_type}: {num_hosts(args.accelerator_type)} host(s), runtime "
          f"{args.runtime_version}, steps {','.join(args.step_list)}", flush=True)
    failed: Optional[BaseException] = None
    step = ""

    def collect_logs():
        if not args.dry_run:
            os.makedirs(args.log_dir, exist_ok=True)
        for c in logs_commands(args):
            run(c)

    try:
        with tempfile.TemporaryDirectory() as tmp:
            for step in [s for s in args.step_list if s != "delete"]:
                print(f"# --- {step}", flush=True)
                if step == "create":
                    for c in create_commands(args):
                        run(c)
                    if args.queued:
                        wait_queued(args, run)
                elif step == "ship":
                    tarball = "warm_jax_src.tar.gz"
                    if not args.repo and not args.dry_run:
                        tarball = make_tarball(tmp)
                    for c in ship_commands(args, tarball):
                        run(c)
                elif step == "setup":
                    run(setup_command(args))
                elif step == "run":
                    run(run_command(args, bindings))
                elif step == "logs":
                    collect_logs()
    except (LaunchError, KeyboardInterrupt) as e:
        failed = e
        print(f"[tpu_pod] step {step!r} failed: {e}", file=sys.stderr, flush=True)
        if step == "run" and "logs" in args.step_list:
            try:
                collect_logs()
            except LaunchError as e2:
                print(f"[tpu_pod] could not collect logs: {e2}", file=sys.stderr, flush=True)
    finally:
        if "delete" in args.step_list:
            print("# --- delete", flush=True)
            try:
                for c in delete_commands(args):
                    run(c)
            except LaunchError as e:
                print(f"[tpu_pod] delete failed: {e}; delete {args.name} by hand",
                      file=sys.stderr, flush=True)
                return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
