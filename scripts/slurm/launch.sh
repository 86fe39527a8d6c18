#!/bin/bash
# One node's `accelerate launch "$@"`, with USR1/TERM forwarded to the training processes it starts.
# Exits with the launcher's status (1 for any failure of the script, 75 included: read run_status.json).
#
# Why a wrapper: accelerate's launcher does not forward signals and USR1 would kill it, leaving the training
# process running, never told (see signal_training.py). The sbatch scripts run it in the background (single
# node) or once per node under srun, which forwards the signals it receives to it.
# Environment: ACCELERATE (launcher, default `accelerate` on PATH), PYTHON (for the helper, default python3),
# LAUNCH_TAG (default host-pid; a caller that knows it can signal the training processes itself).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
tag=${LAUNCH_TAG:-$(hostname -s)-$$}

# In the background, so that the trap returns at once and a second signal is not held up; `--while $$`
# ends it with this script if the run ends before any training process handles the signal.
# shellcheck disable=SC2317  # called by the traps
forward() { "$python" "$here/signal_training.py" send "$tag" "$1" --while $$ & }
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# Only the launcher's environment gets the tag (not this shell's): the helper must never pick a bash trap.
# USR1 is ignored in the launcher (through exec, and on into the training processes until their handler is
# installed): srun and `scancel --full` signal every process of the step, and USR1 would kill the launcher.
(
  trap '' USR1
  RESUMABLE_LAUNCH_TAG=$tag exec "${ACCELERATE:-accelerate}" launch "$@"
) &
launcher=$!
# bash runs a trap only between commands: `wait` returns early (status > 128) when a trapped signal
# arrives, so wait again until the launcher itself has ended.
while :; do
  rc=0
  wait "$launcher" || rc=$?
  kill -0 "$launcher" 2>/dev/null || break
done
# If the launcher died first (Slurm's time limit sends TERM to every process and the single-process launcher
# dies of it), the training process may still be saving its checkpoint: let it finish.
"$python" "$here/signal_training.py" wait "$tag" || true
exit "$rc"
