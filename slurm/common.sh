# Shared by the sbatch scripts in slurm/ (sourced, not run): the environment, and running a
# command under srun that checkpoints and requeues the job when SLURM warns of the time limit.

setup_environment() {
    if [ -n "${AIDETECT_SETUP:-}" ]; then
        source "$AIDETECT_SETUP"  # e.g. module loads and a conda or venv activation
    else
        source "${AIDETECT_VENV:-$AIDETECT_REPO/.venv}/bin/activate"
    fi
    export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
    export PYTHONUNBUFFERED=1
    echo "[aidetect-sbatch] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} task(s)"
}

# run_with_requeue COMMAND...: srun COMMAND; on USR1/TERM (the time-limit warning, preemption, scancel)
# forward USR1 to the tasks so that they checkpoint and exit; then ask the package whether the job goes
# back in the queue (aidetect.preemption: the exit code and the max_requeues cap live there only).
# --kill-on-bad-exit: when one task dies (killed, out of memory, its node lost) srun ends the others at
# once instead of leaving them waiting in a collective; the job is then requeued and resumes.
run_with_requeue() {
    trap 'echo "[aidetect-sbatch] stop signal: checkpointing"; kill -USR1 "$srun_pid" 2>/dev/null' USR1 TERM
    srun --kill-on-bad-exit=1 "$@" &
    srun_pid=$!
    status=0
    while :; do  # a trapped signal ends `wait` early: keep waiting for the tasks
        wait "$srun_pid"
        status=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    if decision=$(python -m aidetect.preemption --exit-status "$status"); then
        local job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
        job=${job:-$SLURM_JOB_ID}
        echo "[aidetect-sbatch] $decision: requeueing job $job"
        scontrol requeue "$job"
        exit 0
    fi
    echo "[aidetect-sbatch] not requeued: $decision"
    exit "$status"
}
