# Shared by train_srun.sbatch and train_deepspeed.sbatch (sourced, not run): the job's hosts, the rendezvous
# address, GPUs per node, the train.py arguments, and running the training step so that SLURM's time-limit
# warning becomes a checkpoint and a requeue.
#
# Signals, as SLURM sends them:
#   SIGUSR1  `#SBATCH --signal=B:USR1@120`: the time limit is 2 minutes away (batch shell only). We send SIGTERM
#            to the training step (`scancel --signal=TERM`), the trainer finishes its iteration, saves a
#            checkpoint and exits 0, and the job is requeued; `--resume auto` continues it.
#   SIGTERM  scancel, preemption, the time limit itself: SLURM signals the training processes directly. The batch
#            shell only keeps waiting (if it exited, SLURM would kill the step mid-checkpoint) and requeues nothing
#            (a cancelled job should stay cancelled; a preempted `--requeue` job is requeued by SLURM).
# Not `kill -TERM <srun pid>`: srun answers SIGTERM with "forcing job termination", i.e. SIGKILL to the tasks.

die() {
    echo "error: $*" >&2
    exit 2
}

# JOB_HOSTS: the allocation's host names in SLURM's node order (the host of SLURM_NODEID 0 first).
read_job_hosts() {
    [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] ||
        die "SLURM_JOB_ID/SLURM_JOB_NODELIST are not set: submit this script with sbatch"
    mapfile -t JOB_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    ((${#JOB_HOSTS[@]} > 0)) || die "'scontrol show hostnames $SLURM_JOB_NODELIST' printed no host name"
}

# MASTER_ADDR/MASTER_PORT for torch.distributed: the first host, and a port derived from the job id (below the
# Linux ephemeral range, the same after a requeue) unless the user exported one.
export_rendezvous() {
    export MASTER_ADDR="${MASTER_ADDR:-${JOB_HOSTS[0]}}"
    export MASTER_PORT="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
}

# GPUs per node: GPUS_PER_NODE if set, else what SLURM allocated (--gres=gpu:N sets SLURM_GPUS_ON_NODE,
# --gpus-per-node=[type:]N sets SLURM_GPUS_PER_NODE).
gpus_per_node() {
    local count="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}"
    count="${count##*:}"
    [[ $count =~ ^[1-9][0-9]*$ ]] ||
        die "cannot tell the GPUs per node (got '${count}'): request them with --gres=gpu:N or export GPUS_PER_NODE=N"
    echo "$count"
}

# srun no longer inherits sbatch's --cpus-per-task (SLURM >= 22.05): without this every task gets one CPU.
export_cpus_per_task() {
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
    fi
}

# TRAIN_ARGS: train.py's arguments from CONFIG, RESUME and OUTPUT_DIR, then the script's own arguments (last, so
# they override).
set_train_args() {
    TRAIN_ARGS=()
    [[ -z $CONFIG ]] || TRAIN_ARGS+=(--config "$CONFIG")
    [[ -z $RESUME ]] || TRAIN_ARGS+=(--resume "$RESUME")
    [[ -z $OUTPUT_DIR ]] || TRAIN_ARGS+=(--output_dir "$OUTPUT_DIR")
    TRAIN_ARGS+=("$@")
}

_on_time_limit_warning() {
    STOP_REQUESTED=1
    WAIT_INTERRUPTED=1
    echo "rlhf-ds: time limit near (SIGUSR1): asking the training step to checkpoint and stop" >&2
    scancel --signal=TERM "$SLURM_JOB_ID" || echo "warning: scancel --signal=TERM $SLURM_JOB_ID failed" >&2
}

_on_sigterm() {
    WAIT_INTERRUPTED=1
    echo "rlhf-ds: SIGTERM: waiting for the training step to checkpoint and exit" >&2
}

# Run a job step (an srun command) and exit with its status; after a time-limit warning, requeue the job.
# bash runs traps only between commands, so the step runs in the background while the shell waits for it.
run_step() {
    STOP_REQUESTED=0
    trap _on_time_limit_warning USR1
    trap _on_sigterm TERM
    "$@" &
    local pid=$! rc
    while :; do
        WAIT_INTERRUPTED=0
        rc=0
        wait "$pid" || rc=$?
        ((WAIT_INTERRUPTED)) || break # a trap ended `wait` early: the step is still running
    done
    trap - USR1 TERM
    if ((STOP_REQUESTED)); then
        if ((${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES)); then
            echo "rlhf-ds: not requeueing: the job already ran $((SLURM_RESTART_COUNT + 1)) times" \
                "(MAX_REQUEUES=$MAX_REQUEUES); resubmit to continue from the last checkpoint" >&2
            exit "$rc"
        fi
        echo "rlhf-ds: training step exited with $rc; requeueing job $SLURM_JOB_ID to resume from its newest checkpoint"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "warning: scontrol requeue $SLURM_JOB_ID failed: resubmit to continue from the last checkpoint" >&2
    fi
    exit "$rc"
}
