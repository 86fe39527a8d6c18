#!/bin/bash
# Tear down what slurm-up.sh started, by PID only.
# Copied from ../shared/slurm (verified recipe) so that the repository is self-contained; shellcheck-clean.
BASE=${BASE:-/tmp/slurm_probe}; export SLURM_CONF=$BASE/slurm.conf
alive() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
# cancel every job of this throw-away cluster so slurmd cleans up its slurmstepds
mapfile -t jobs < <(squeue -h -o %A 2>/dev/null)
[ ${#jobs[@]} -gt 0 ] && scancel "${jobs[@]}"
for _ in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
pids=$(cat "$BASE"/slurmd.pid "$BASE"/slurmctld.pid "$BASE"/munged.pid 2>/dev/null)
for p in $pids; do kill -TERM "$p" 2>/dev/null; done
for p in $pids; do for _ in $(seq 100); do alive "$p" || break; sleep 0.1; done
  alive "$p" && kill -KILL "$p"; done
rm -f "$BASE"/slurmd.pid "$BASE"/slurmctld.pid "$BASE"/munged.pid
[ "$(readlink /etc/slurm/slurm.conf)" = "$BASE/slurm.conf" ] && rm -f /etc/slurm/slurm.conf
echo "slurm down"
