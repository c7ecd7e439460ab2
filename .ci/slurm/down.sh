#!/usr/bin/env bash
# Stop the CI cluster started by up.sh: cancel leftover jobs, then stop both slurmd,
# slurmctld and munged by their pid files. Safe to run when nothing is up.
set -uo pipefail
STATE=/var/lib/slurm-ci

stop_pid() {  # stop_pid PIDFILE: TERM the recorded daemon and wait for it to exit
  [[ -s $1 ]] || return 0
  local pid; pid="$(cat "$1")"
  kill "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null; rm -f "$1"
}

if command -v scontrol >/dev/null && scontrol ping >/dev/null 2>&1; then
  jobs="$(squeue -h -t pending,running,suspended,completing -o %i 2>/dev/null)"
  if [[ -n $jobs ]]; then
    # shellcheck disable=SC2086
    scancel $jobs
    for _ in $(seq 30); do  # let slurmd reap the steps before it goes away
      [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break; sleep 1
    done
  fi
fi
for n in n1 n2; do stop_pid "$STATE/slurmd_$n.pid"; done
stop_pid "$STATE/slurmctld.pid"
stop_pid /run/munge/munged.pid
# The n1/n2 host entry added by up.sh (rewritten in place: /etc/hosts may be a mount).
if grep -q '# slurm-ci$' /etc/hosts 2>/dev/null; then
  hosts="$(grep -v '# slurm-ci$' /etc/hosts)"; printf '%s\n' "$hosts" >/etc/hosts
fi
echo "down.sh: slurm CI cluster stopped"
