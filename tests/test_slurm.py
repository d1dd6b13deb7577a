"""launch/slurm/: the sbatch scripts on an emulated SLURM, with real 2-rank CPU training runs (gloo).

This machine has no SLURM. The test puts fake ``scontrol``, ``srun`` and ``scancel`` on PATH that do what
SLURM does for the calls the scripts make:

- ``scontrol show hostnames LIST`` expands a hostlist (``node[01-02],gpu7``), one name per line;
  ``scontrol requeue JOB`` is logged.
- ``srun`` starts the step's tasks as local processes, block-distributed over the job's nodes, with
  SLURM_PROCID/SLURM_LOCALID/SLURM_NODEID/SLURM_STEP_NUM_TASKS set and the CPUs split between the tasks of a
  node (task affinity). Each task runs in its own process group, standing in for its cgroup: when the tasks
  have exited, what they left behind is killed; ``--kill-on-bad-exit`` kills the step when a task fails;
  SIGTERM to srun itself kills the tasks ("forcing job termination"); srun exits with the highest task status.
- ``scancel --signal=SIG JOB`` sends SIG to every process of the running steps (not to the batch shell).

The sbatch scripts run with ``bash`` as sbatch would run them, with the variables sbatch sets. Where a test is
about the scripts' plumbing rather than training, ``PYTHON`` is a fake that records how it was started.
"""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_ds.distributed import free_port
from test_distributed import prepare_training_runs

REPO = Path(__file__).resolve().parents[1]
SRUN_SCRIPT = REPO / "launch" / "slurm" / "train_srun.sbatch"
DEEPSPEED_SCRIPT = REPO / "launch" / "slurm" / "train_deepspeed.sbatch"
TIMEOUT_S = 600
JOB_ID = "4242"
TINY = ["--iterations", "2", "--rollout_batch_size", "2", "--mini_batch_size", "2", "--max_new_tokens", "8",
        "--save_interval", "0"]
LONG = 200  # iterations of a run that is stopped by a signal after its first one
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                 "OMP_NUM_THREADS", "CONFIG", "OUTPUT_DIR", "RESUME", "GPUS_PER_NODE", "HOSTFILE", "PYTHON",
                 "REPO_DIR", "MAX_REQUEUES")

FAKE_SLURM = r'''
"""scontrol, srun or scancel (this file, called by one of those names): what launch/slurm/ uses of each."""
import functools, json, os, re, signal, subprocess, sys, time

STATE = os.environ["FAKE_SLURM_DIR"]
STEPS = os.path.join(STATE, "steps")


def log(line):
    with open(os.path.join(STATE, "commands.log"), "a") as fh:
        fh.write(line + "\n")


def expand(hostlist):
    """'node[01-03,7],gpu1' -> node01 node02 node03 node07 gpu1 (zero padding from the range's start)."""
    hosts, depth, item = [], 0, ""
    for ch in hostlist + ",":
        if ch == "," and depth == 0:
            hosts += _expand_item(item)
            item = ""
            continue
        depth += (ch == "[") - (ch == "]")
        item += ch
    return hosts


def _expand_item(item):
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)$", item)
    if not match:
        return [item] if item else []
    prefix, ranges, rest = match.groups()
    names = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        for n in range(int(lo), int(hi or lo) + 1):
            names += [prefix + str(n).zfill(len(lo)) + tail for tail in (_expand_item(rest) or [""])]
    return names


def scontrol(args):
    if args[:2] == ["show", "hostnames"] and len(args) == 3:
        print("\n".join(expand(args[2])))
        return 0
    if args[:1] == ["requeue"] and len(args) == 2:
        log("scontrol requeue " + args[1])
        return 0
    print(f"fake scontrol: unsupported: {args}", file=sys.stderr)
    return 1


def scancel(args):
    signame = "KILL"
    jobs = []
    for arg in args:
        if arg.startswith("--signal="):
            signame = arg.split("=", 1)[1].upper().removeprefix("SIG")
        elif arg.startswith("-"):
            print(f"fake scancel: unsupported option {arg}", file=sys.stderr)
            return 1
        else:
            jobs.append(arg)
    log(f"scancel --signal={signame} {' '.join(jobs)}")
    for name in os.listdir(STEPS) if os.path.isdir(STEPS) else []:
        with open(os.path.join(STEPS, name)) as fh:
            for pgid in json.load(fh):
                _killpg(pgid, signal.Signals["SIG" + signame])
    return 0


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def srun(args):
    known = {"--nodes", "--ntasks", "--ntasks-per-node", "--kill-on-bad-exit"}
    opts = {}
    while args and args[0].startswith("-"):
        key, eq, value = args.pop(0).partition("=")
        if key not in known:
            print(f"fake srun: unsupported option {key}", file=sys.stderr)
            return 1
        opts[key] = value if eq else args.pop(0)
    env = os.environ
    nodes = int(opts.get("--nodes") or env.get("SLURM_JOB_NUM_NODES", "1"))
    per_node = opts.get("--ntasks-per-node") or env.get("SLURM_NTASKS_PER_NODE")
    ntasks = int(opts.get("--ntasks") or (int(per_node) * nodes if per_node else env.get("SLURM_NTASKS", nodes)))
    per_node = -(-ntasks // nodes)
    hosts = expand(env["SLURM_JOB_NODELIST"])[:nodes]
    cpus = sorted(os.sched_getaffinity(0))
    log(f"srun nodes={nodes} ntasks={ntasks} {' '.join(args)}")
    procs = []
    for rank in range(ntasks):
        node, local = divmod(rank, per_node)
        share = cpus[local * len(cpus) // per_node:(local + 1) * len(cpus) // per_node] or cpus
        task_env = {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node),
                    "SLURMD_NODENAME": hosts[node], "SLURM_STEP_NUM_TASKS": str(ntasks),
                    "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_ID": "0"}
        procs.append(subprocess.Popen(args, env=task_env, start_new_session=True,
                                      preexec_fn=functools.partial(os.sched_setaffinity, 0, share)))
    os.makedirs(STEPS, exist_ok=True)
    step_file = os.path.join(STEPS, str(os.getpid()))
    with open(step_file, "w") as fh:
        json.dump([p.pid for p in procs], fh)

    def forward(signum, frame):
        if signum in (signal.SIGTERM, signal.SIGHUP):
            log("srun: forcing job termination")
            signum = signal.SIGKILL
        for p in procs:
            _killpg(p.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    status = {}
    while len(status) < len(procs):
        for p in procs:
            if p.pid not in status and p.poll() is not None:
                status[p.pid] = p.returncode if p.returncode >= 0 else 128 - p.returncode
                if status[p.pid] and opts.get("--kill-on-bad-exit") == "1":
                    log(f"srun: task exited with {status[p.pid]}: killing the step")
                    for q in procs:
                        _killpg(q.pid, signal.SIGKILL)
        time.sleep(0.05)
    for p in procs:  # the step is over: SLURM kills what its tasks left behind
        _killpg(p.pid, signal.SIGKILL)
    os.unlink(step_file)
    return max(status.values())


COMMANDS = {"scontrol": scontrol, "srun": srun, "scancel": scancel}
sys.exit(COMMANDS[os.path.basename(sys.argv[0])](sys.argv[1:]))
'''

FAKE_PYTHON = r'''
"""Stands in for python in the sbatch scripts: records its arguments and environment, then plays a trainer.

FAKE_TRAINER=exit: exit 0 at once. FAKE_TRAINER=wait: until SIGTERM arrives (60 s at most), then "save a
checkpoint" for a second and exit 0.
"""
import json, os, signal, sys, time

STATE = os.environ["FAKE_SLURM_DIR"]
ENV = ("SLURM_PROCID", "SLURM_NODEID", "SLURM_STEP_NUM_TASKS", "SLURMD_NODENAME", "MASTER_ADDR", "MASTER_PORT",
       "RANK", "WORLD_SIZE", "SRUN_CPUS_PER_TASK")
args = sys.argv[1:]
record = {"argv": args, "env": {name: os.environ.get(name) for name in ENV}, "cwd": os.getcwd(),
          "sigterm_ignored": signal.getsignal(signal.SIGTERM) == signal.SIG_IGN}
if "--hostfile" in args:
    with open(args[args.index("--hostfile") + 1]) as fh:
        record["hostfile"] = fh.read()
name = "task" + os.environ.get("SLURM_PROCID", "-")
os.makedirs(os.path.join(STATE, "tasks"), exist_ok=True)
if os.environ.get("FAKE_TRAINER") == "wait":
    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    open(os.path.join(STATE, "tasks", name + ".ready"), "w").close()
    deadline = time.time() + 60
    while not received and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    record["stopped_by"] = "SIGTERM" if received else None
with open(os.path.join(STATE, "tasks", name + ".json"), "w") as fh:
    json.dump(record, fh)
'''


def _write_executable(path: Path, source: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{source}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def slurm(tmp_path):
    """A fake SLURM on PATH: returns (environment for a batch script, state directory)."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    for command in ("scontrol", "srun", "scancel"):
        _write_executable(bin_dir / command, FAKE_SLURM)
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "SRUN_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_SLURM_DIR=str(state), SLURM_JOB_ID=JOB_ID,
               SLURM_SUBMIT_DIR=str(REPO), PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    yield env, state
    for step in (state / "steps").glob("*"):  # a failed test must not leave ranks running
        for pgid in json.loads(step.read_text()):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _commands(state: Path) -> list[str]:
    log = state / "commands.log"
    return log.read_text().splitlines() if log.exists() else []


def _tasks(state: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((state / "tasks").glob("task*.json"))]


class BatchJob:
    """An sbatch script running under ``bash`` (in its own process group, killed if the test fails)."""

    def __init__(self, script: Path, env: dict, *args: str, cwd: Path = REPO):
        self.proc = subprocess.Popen(["bash", str(script), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def finish(self) -> tuple[int, str]:
        try:
            output, _ = self.proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            output, _ = self.proc.communicate()
            pytest.fail(f"batch script still running after {TIMEOUT_S} s:\n{output[-6000:]}")
        return self.proc.returncode, output

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)


def run_batch(script: Path, env: dict, *args: str) -> tuple[int, str]:
    return BatchJob(script, env, *args).finish()


def _wait_for(condition, what: str, job: BatchJob, timeout: float = TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while not condition():
        if job.proc.poll() is not None:
            pytest.fail(f"batch script ended (rc {job.proc.returncode}) before {what}:\n{job.finish()[1][-6000:]}")
        if time.time() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.2)


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _assert_no_shm_buffer(port: str) -> None:
    mapped = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not mapped, f"DeepSpeed's shm all-reduce op ran (distributed._skip_shm_comm_op): {mapped}"


@pytest.fixture
def real_run(slurm, tmp_path):
    """Environment for a real 2-rank training run on one emulated node; returns (env, state, output dir)."""
    prepare_training_runs()
    env, state = slurm
    out = tmp_path / "run"
    env.update(SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="2", GPUS_PER_NODE="2",
               CONFIG="launch/configs/embedded.yaml", OUTPUT_DIR=str(out), HOSTFILE=str(tmp_path / "hostfile"))
    return env, state, out


# --- real training runs ---------------------------------------------------------------------------------------

def _stop_at_time_limit_warning(script: Path, env: dict, args: list[str], out: Path) -> tuple[str, int]:
    """Start a batch job, send the time-limit warning (SIGUSR1) after its first iteration and check that it
    stopped early with a complete checkpoint; returns (output, iterations completed)."""
    job = BatchJob(script, env, *args)
    _wait_for(lambda: len(_metrics(out)) >= 1, "first iteration", job)
    job.signal(signal.SIGUSR1)
    rc, output = job.finish()
    assert rc == 0, output[-6000:]
    assert "rlhf-ds: 2 rank(s)" in output and "SIGTERM received: stopped after iteration" in output
    stopped_at = len(_metrics(out))
    assert 1 <= stopped_at < LONG, "the run should have stopped early"
    assert (out / "checkpoints" / f"iter_{stopped_at:07d}" / "manifest.json").is_file()
    assert not (out / "policy").exists(), "a stopped run exports nothing: it is not finished"
    return output, stopped_at


def test_time_limit_warning_checkpoints_requeues_and_resumes(real_run):
    """SIGUSR1 (--signal=B:USR1@120) -> SIGTERM to the ranks -> checkpoint, exit 0 -> requeue -> --resume auto."""
    env, state, out = real_run
    args = [*TINY, "--iterations", str(LONG)]
    _, stopped_at = _stop_at_time_limit_warning(SRUN_SCRIPT, env, args, out)
    # srun started `python launch/train.py` twice with only SLURM variables + MASTER_ADDR/PORT: two ranks.
    assert f"srun nodes=1 ntasks=2 {sys.executable} -u launch/train.py" in "\n".join(_commands(state))
    config = json.loads((out / "config.json").read_text())
    assert (config["output_dir"], config["resume"], config["iterations"]) == (str(out), "auto", LONG)
    assert config["max_new_tokens"] == 8 and config["kl_coef_max"] == 2.0  # the override and the CONFIG file
    assert _commands(state)[-2:] == [f"scancel --signal=TERM {JOB_ID}", f"scontrol requeue {JOB_ID}"]

    # The requeued job: same script and arguments, SLURM_RESTART_COUNT=1; --iterations (a change resume allows)
    # keeps it short.
    rc, output = run_batch(SRUN_SCRIPT, {**env, "SLURM_RESTART_COUNT": "1"}, *args, "--iterations",
                           str(stopped_at + 2))
    assert rc == 0, output[-6000:]
    assert f"resumed from {out / 'checkpoints' / f'iter_{stopped_at:07d}'}" in output
    assert [m["iteration"] for m in _metrics(out)] == list(range(stopped_at + 2))
    assert _commands(state)[-1].startswith("srun "), "a finished run must not requeue"
    _assert_no_shm_buffer(env["MASTER_PORT"])


def test_deepspeed_script_one_node_two_ranks_checkpoints_on_time_limit(real_run):
    """Through the real deepspeed launcher (hostfile, --no_ssh, --node_rank): the launcher must outlive its
    ranks' checkpoint, then the job is requeued with --resume auto (the requeued job's resume: the srun test
    above, through the same trainer)."""
    env, state, out = real_run
    env.pop("SLURM_NTASKS")  # one task per node: the script's own srun options
    args = [*TINY, "--iterations", str(LONG)]
    _stop_at_time_limit_warning(DEEPSPEED_SCRIPT, env, args, out)
    assert Path(env["HOSTFILE"]).read_text() == "localhost slots=2\n"
    # The launcher exits 1 after forwarding SIGTERM although its ranks exited 0: the job is requeued all the same.
    commands = _commands(state)
    assert f"scancel --signal=TERM {JOB_ID}" in commands and commands[-1] == f"scontrol requeue {JOB_ID}"
    assert json.loads((out / "config.json").read_text())["resume"] == "auto"
    _assert_no_shm_buffer(env["MASTER_PORT"])


# --- the scripts' plumbing, with a fake python -------------------------------------------------------------

@pytest.fixture
def fake_python(slurm, tmp_path):
    """PYTHON = a recorder; the scripts run from a submit directory that links to this repository's launch/."""
    env, state = slurm
    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    (submit_dir / "launch").symlink_to(REPO / "launch")
    env.update(PYTHON=str(_write_executable(tmp_path / "fake_python", FAKE_PYTHON)), SLURM_SUBMIT_DIR=str(submit_dir),
               FAKE_TRAINER="exit")
    return env, state, submit_dir


def test_deepspeed_script_two_nodes_one_launcher_each(fake_python):
    env, state, submit_dir = fake_python
    del env["MASTER_PORT"]
    env.update(SLURM_JOB_NODELIST="node[01-02]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_PER_NODE="h100:4",
               SLURM_CPUS_PER_TASK="16", RANK="7")
    rc, output = run_batch(DEEPSPEED_SCRIPT, env, "--kl_coef", "0.1")
    assert rc == 0, output
    hostfile = "runs/slurm-4242.hostfile"
    assert (submit_dir / hostfile).read_text() == "node01 slots=4\nnode02 slots=4\n"
    tasks = _tasks(state)
    assert len(tasks) == 2
    for node, task in enumerate(tasks):
        assert task["argv"] == ["-m", "deepspeed.launcher.runner", "--no_ssh", "--node_rank", str(node),
                                "--hostfile", hostfile, "--master_addr", "node01", "--master_port", "14242",
                                "launch/train.py", "--config", "launch/configs/qwen2_hh.yaml", "--resume", "auto",
                                "--kl_coef", "0.1"]
        assert task["hostfile"] == "node01 slots=4\nnode02 slots=4\n"
        assert task["cwd"] == str(submit_dir)
        assert task["sigterm_ignored"], "the launcher must outlive its ranks' checkpoint"
        assert task["env"]["RANK"] is None and task["env"]["SRUN_CPUS_PER_TASK"] == "16"
        assert task["env"]["SLURMD_NODENAME"] == f"node0{node + 1}"


def test_srun_script_two_nodes_one_task_per_gpu(fake_python):
    env, state, submit_dir = fake_python
    del env["MASTER_PORT"]
    env.update(SLURM_JOB_NODELIST="gpu[7-8]", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="4", CONFIG="",
               OUTPUT_DIR="runs/x", RANK="3", WORLD_SIZE="1")
    rc, output = run_batch(SRUN_SCRIPT, env, "--iterations", "5")
    assert rc == 0, output
    tasks = _tasks(state)
    assert [t["argv"] for t in tasks] == [["-u", "launch/train.py", "--resume", "auto", "--output_dir", "runs/x",
                                           "--iterations", "5"]] * 4
    assert [(t["env"]["SLURM_PROCID"], t["env"]["SLURMD_NODENAME"]) for t in tasks] == [
        ("0", "gpu7"), ("1", "gpu7"), ("2", "gpu8"), ("3", "gpu8")]
    for task in tasks:
        assert task["env"]["MASTER_ADDR"] == "gpu7" and task["env"]["MASTER_PORT"] == "14242"
        assert task["env"]["SLURM_STEP_NUM_TASKS"] == "4"
        assert task["env"]["RANK"] is None and task["env"]["WORLD_SIZE"] is None, "stale launcher variables"
        assert not task["sigterm_ignored"]


@pytest.mark.parametrize("gpus, slots", [
    ({"GPUS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}, 3),
    ({"SLURM_GPUS_ON_NODE": "8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "2"}, 2),
    ({}, None),
    ({"GPUS_PER_NODE": "eight"}, None),
])
def test_deepspeed_script_gpus_per_node(fake_python, gpus, slots):
    env, state, _ = fake_python
    env.update(SLURM_JOB_NODELIST="n1", SLURM_JOB_NUM_NODES="1", **gpus)
    rc, output = run_batch(DEEPSPEED_SCRIPT, env)
    if slots is None:
        assert rc == 2 and "export GPUS_PER_NODE=N" in output
        assert not any(c.startswith("srun") for c in _commands(state)), "nothing may start"
    else:
        assert rc == 0, output
        assert [t["hostfile"] for t in _tasks(state)] == [f"n1 slots={slots}\n"]


@pytest.mark.parametrize("script", [SRUN_SCRIPT, DEEPSPEED_SCRIPT], ids=["srun", "deepspeed"])
def test_scripts_refuse_to_run_outside_slurm_or_the_repository(fake_python, script, tmp_path):
    env, state, _ = fake_python
    rc, output = run_batch(script, {**env, "GPUS_PER_NODE": "1"})  # no SLURM_JOB_NODELIST
    assert rc == 2 and "submit this script with sbatch" in output
    rc, output = run_batch(script, {**env, "SLURM_JOB_NODELIST": "n1", "SLURM_SUBMIT_DIR": str(tmp_path)})
    assert rc == 2 and "submit from the rlhf-ds repository root or set REPO_DIR" in output
    assert _commands(state) == []


def _start_waiting_trainers(env: dict, state: Path, ntasks: int) -> BatchJob:
    env.update(SLURM_JOB_NODELIST="n1", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS=str(ntasks), FAKE_TRAINER="wait")
    job = BatchJob(SRUN_SCRIPT, env)
    _wait_for(lambda: len(list((state / "tasks").glob("*.ready"))) == ntasks, "trainers ready", job, 60)
    return job


@pytest.mark.parametrize("restarts, requeued", [(0, True), (20, False)])
def test_time_limit_warning_stops_the_step_gently_then_requeues(fake_python, restarts, requeued):
    env, state, _ = fake_python
    env["SLURM_RESTART_COUNT"] = str(restarts)
    job = _start_waiting_trainers(env, state, 2)
    job.signal(signal.SIGUSR1)
    rc, output = job.finish()
    assert rc == 0, output
    assert [t["stopped_by"] for t in _tasks(state)] == ["SIGTERM", "SIGTERM"], "SIGTERM, not SIGKILL, to the ranks"
    assert f"scancel --signal=TERM {JOB_ID}" in _commands(state)
    assert (f"scontrol requeue {JOB_ID}" in _commands(state)) == requeued
    if not requeued:
        assert "MAX_REQUEUES=20" in output


def test_sigterm_to_the_batch_shell_waits_for_the_checkpoint_and_does_not_requeue(fake_python):
    """scancel/preemption: SLURM signals the batch shell and the step; the shell must outlive the step."""
    env, state, _ = fake_python
    job = _start_waiting_trainers(env, state, 2)
    job.signal(signal.SIGTERM)
    subprocess.run(["scancel", "--signal=TERM", JOB_ID], env=env, check=True, timeout=60)
    rc, output = job.finish()
    assert rc == 0, output
    assert "waiting for the training step" in output
    assert [t["stopped_by"] for t in _tasks(state)] == ["SIGTERM", "SIGTERM"]
    assert not any(c.startswith("scontrol requeue") for c in _commands(state))
