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
# forward USR1 to the tasks so that they checkpoint and exit; then the package decides from SLURM's record
# of the step whether the job goes back in the queue and requeues it (aidetect.cluster.requeue: the exit
# codes, the rule and the max_requeues cap, from $AIDETECT_PROFILE's profile, live in the package only).
# The script exits 0 when the job was requeued or finished, else non-zero: the job ends FAILED, also when
# SLURM refused the requeue (e.g. a job submitted with --no-requeue), never COMPLETED with the run unfinished.
# --kill-on-bad-exit: when one task dies (killed, out of memory, its node lost) srun ends the others at
# once instead of leaving them waiting in a collective.
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
    local job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    python -m aidetect.cluster.requeue --exit-status "$status" --job "${job:-$SLURM_JOB_ID}"
    exit $?
}
