# shellcheck shell=bash
# Sourced by train.sbatch and train_multinode.sbatch: settings, the job header, waiting, and the final verdict.
# Settings (environment variables; paths relative to REPO_DIR):
#   REPO_DIR          the repository (default: the directory sbatch was called from)
#   VENV              its virtual environment, put first on PATH if it exists (default: $REPO_DIR/.venv)
#   ACCELERATE_CONFIG launch config (default: accelerate_configs/cpu.yaml, the tiny CPU job)
#   TRAIN_CONFIG      training preset (default: configs/tiny_lm.yaml; empty: none, flags only)
#   TRAIN_ARGS        more training flags, split on whitespace (default: none)
#   OUTPUT_DIR        where checkpoints and run_status.json go (default: the output_dir that TRAIN_CONFIG and
#                     TRAIN_ARGS give, with -task<N> appended in job arrays)
#   SCRATCH           fast per-user storage for caches (default: $TMPDIR or /tmp, plus the user name)
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR" || { echo "=== FAILURE: no repository at REPO_DIR=$REPO_DIR"; exit 2; }
VENV=${VENV:-$REPO_DIR/.venv}
[[ -d $VENV/bin ]] && export PATH="$VENV/bin:$PATH"
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/cpu.yaml}
TRAIN_CONFIG=${TRAIN_CONFIG-configs/tiny_lm.yaml}
read -ra train_args <<<"${TRAIN_ARGS:-}"
if [[ -n $TRAIN_CONFIG ]]; then
  train_args=(--config "$TRAIN_CONFIG" "${train_args[@]}")
fi
# src on the path, as scripts/train.py does: the repository works without being installed
resumable_py() { PYTHONPATH="$REPO_DIR/src${PYTHONPATH:+:$PYTHONPATH}" python3 "$@"; }
if [[ -z ${OUTPUT_DIR:-} ]]; then # the preset's own output_dir: the same resolution train.py does
  OUTPUT_DIR=$(resumable_py -m resumable.config --get output_dir "${train_args[@]}") || {
    echo "=== FAILURE: cannot tell the output dir from ${train_args[*]} (error above); set OUTPUT_DIR"
    exit 2
  }
  OUTPUT_DIR+=${SLURM_ARRAY_TASK_ID:+-task$SLURM_ARRAY_TASK_ID}
fi
# The script and its arguments, after accelerate's own options. --output_dir last: it is where the verdict is read.
train_cmd=(scripts/train.py "${train_args[@]}" --output_dir "$OUTPUT_DIR")
# Home directories are often small and slow network mounts: keep the hub and dataset caches on scratch.
scratch=${SCRATCH:-${TMPDIR:-/tmp}/$(id -un)}
export HF_HOME=${HF_HOME:-$scratch/huggingface}
export RESUMABLE_CACHE=${RESUMABLE_CACHE:-$scratch/resumable}
export PYTHONUNBUFFERED=1 # the job log shows progress as it happens
# torchrun gives the training processes TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default) between its SIGTERM
# (scancel, a preemption) and SIGKILL: 2 x (step + save) as this output dir's earlier runs measured, else 120 s.
if [[ -z ${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-} ]]; then
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$(resumable_py -m resumable.signal_lead --shutdown-timeout "$OUTPUT_DIR") ||
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# A status left by an earlier run (here or in the bucket of an s3:// OUTPUT_DIR) must not be mistaken for this
# one's, or a crash would requeue forever: train.py records this attempt's id, and finish() trusts only that.
export RESUMABLE_ATTEMPT="${SLURM_JOB_ID:-local}-${SLURM_RESTART_COUNT:-0}-$(date +%s%N)"

job_header() {
  echo "=== $(date -Is) job ${SLURM_JOB_ID:-none} on $(hostname -s): SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}"
  echo "repo $REPO_DIR, launch config $ACCELERATE_CONFIG, HF_HOME $HF_HOME, shutdown timeout ${TORCH_ELASTIC_SHUTDOWN_TIMEOUT}s"
  echo "training: ${train_cmd[*]}"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi || echo "nvidia-smi failed (exit $?)"
  else
    echo "no GPU: nvidia-smi not found"
  fi
}

# Wait for the background command $1 and return its exit status. A trapped signal cuts `wait` short
# (status > 128) while the command still runs: wait again.
wait_for() {
  local rc
  while :; do
    rc=0
    wait "$1" || rc=$?
    kill -0 "$1" 2>/dev/null || return "$rc"
  done
}

# The verdict, from the launcher's status $1 and run_status.json: the launcher says 1 for both a crash and
# "checkpointed, run me again" (75), so the file decides. Ends the script.
finish() {
  local code=0 status job
  status=$(resumable_py -m resumable.preemption "$OUTPUT_DIR" --attempt "$RESUMABLE_ATTEMPT" 2>&1) || code=$?
  if [[ $1 == 0 ]]; then
    echo "=== SUCCESS: $status (output $OUTPUT_DIR)"
    exit 0
  fi
  if [[ $code != 75 ]]; then
    echo "=== FAILURE: launcher exit $1; $status"
    exit 1
  fi
  # Job arrays: requeue this task, not the whole array.
  job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
  job=${job:-${SLURM_JOB_ID:-}}
  if [[ -z $job ]]; then
    # A checkpointed stop is not a failure: outside Slurm nothing requeues it, so the person must re-run it.
    echo "=== STOPPED: checkpointed ($status); not a Slurm job: run it again to continue"
    exit 75
  fi
  if ! command -v scontrol >/dev/null; then
    echo "=== FAILURE: $status, but scontrol is not on PATH, so the job cannot requeue itself: resubmit it"
    exit 75
  fi
  echo "$status: scontrol requeue $job"
  # The requeue ends this run of the job with SIGTERM to all its processes, possibly before scontrol has
  # returned: ignore it (inherited by scontrol) so that the verdict is not lost. The training has ended.
  trap '' TERM
  if ! scontrol requeue "$job"; then
    echo "=== FAILURE: scontrol requeue $job failed (no --requeue, or cancelled or requeued by Slurm already)"
    exit 75
  fi
  echo "=== REQUEUED: job $job goes back to the queue and will resume from the checkpoint"
  exit 0
}
