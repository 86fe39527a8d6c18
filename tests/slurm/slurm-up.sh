#!/bin/bash
# Bring up a throw-away single-node Slurm 22.05 cluster on localhost (no systemd).
# Copied from ../shared/slurm (verified recipe) so that the repository is self-contained; shellcheck-clean.
# Usage: BASE=/tmp/slurm_probe ./slurm-up.sh     (requires root)
set -euo pipefail
BASE=${BASE:-/tmp/slurm_probe}
NODE=$(hostname -s)
export DEBIAN_FRONTEND=noninteractive
command -v slurmctld >/dev/null || apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
mkdir -p "$BASE"; cd "$BASE"
rm -rf state spool; mkdir -p state spool

# --- munge ---
[ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged          # forks; pid in /run/munge/munged.pid
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  cp /run/munge/munged.pid "$BASE/munged.pid"
fi

# --- slurm.conf ---
cat > slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire seconds before they may start again (default 120)
AuthInfo=cred_expire=${CRED_EXPIRE:-5}
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/slurmctld.log
SlurmdLogFile=$BASE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$BASE/slurm.conf
# make plain `sbatch`/`squeue` work without SLURM_CONF in the environment
[ "${LINK_ETC:-1}" = 1 ] && ln -sf "$SLURM_CONF" /etc/slurm/slurm.conf

# --- daemons (they daemonize; pids land in $BASE/*.pid) ---
slurmctld -c        # -c: cold start, discard any old job state
slurmd -c
for _ in $(seq 100); do
  [ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" = idle ] && { echo "slurm up: node $NODE idle"; exit 0; }
  sleep 0.2
done
echo "slurm did not come up" >&2; tail -n 20 slurmctld.log slurmd.log >&2; exit 1
