#!/usr/bin/env bash
# Start a two-node Slurm cluster on this one host for CI (tests/test_slurm.py):
# munge, slurmctld and two slurmd (fake nodes n1, n2, 2 fake GPUs each), then wait for
# both nodes to be idle and run `srun -N2 -n2 hostname`. Needs root. Idempotent: daemons
# that are already up with the same config are left alone.
# Setup and pitfalls: shared/reference/snakemake_slurm.md §4.2-4.5.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STATE=/var/lib/slurm-ci
TIMEOUT="${SLURM_CI_TIMEOUT:-90}"   # seconds to wait for idle nodes

[[ $(id -u) -eq 0 ]] || { echo "up.sh: must run as root" >&2; exit 1; }

dump_logs() {
  echo "---- sinfo -N -l" >&2; sinfo -N -l >&2 2>&1 || true
  for f in "$STATE"/log/*.log /var/log/munge/munged.log; do
    [[ -f $f ]] && { echo "---- $f (tail)" >&2; tail -n 40 "$f" >&2; }
  done
  return 0
}
fail() { echo "up.sh: $*" >&2; dump_logs; exit 1; }

alive() {  # alive PIDFILE: the daemon recorded there is running
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

# ---- packages -------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v srun >/dev/null || ! command -v munged >/dev/null; then
  echo "up.sh: installing slurm from the distribution"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
echo "up.sh: $(slurmctld -V)"

# ---- config ---------------------------------------------------------------------------
HOST="$(hostname -s)"
CPUS="$(nproc)"
mkdir -p /etc/slurm "$STATE"/spool/ctld "$STATE"/spool/d_n1 "$STATE"/spool/d_n2 "$STATE"/log
conf_changed=0
render() {  # render SRC DST: install DST only if its content changes
  local tmp; tmp="$(mktemp)"
  sed -e "s/@HOST@/$HOST/g" -e "s/@CPUS@/$CPUS/g" "$1" >"$tmp"
  if ! cmp -s "$tmp" "$2"; then install -m 0644 "$tmp" "$2"; conf_changed=1; fi
  rm -f "$tmp"
}
render "$HERE/slurm.conf.in" /etc/slurm/slurm.conf
render "$HERE/gres.conf" /etc/slurm/gres.conf
# Node names resolve on a real cluster, and launchers that use them as a rendezvous
# address (submitit jobs, DINOv2) rely on it: make n1/n2 resolve to this host.
if ! getent hosts n1 >/dev/null || ! getent hosts n2 >/dev/null; then
  echo "127.0.0.1 n1 n2  # slurm-ci" >>/etc/hosts || fail "cannot add n1, n2 to /etc/hosts"
fi

# ---- munge ----------------------------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [[ ! -s /etc/munge/munge.key ]]; then  # the Debian package normally creates it
    mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || fail "munged did not start"
fi

# ---- daemons --------------------------------------------------------------------------
stop_pid() {  # stop_pid PIDFILE: TERM the recorded daemon and wait for it to exit
  alive "$1" || return 0
  local pid; pid="$(cat "$1")"; kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
if [[ $conf_changed == 1 ]]; then  # a new config needs fresh daemons
  for n in n2 n1; do stop_pid "$STATE/slurmd_$n.pid"; done
  stop_pid "$STATE/slurmctld.pid"
fi
if ! alive "$STATE/slurmctld.pid"; then
  # -c: start from an empty job state; CI clusters are throwaway.
  slurmctld -c || fail "slurmctld did not start"
fi
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping >/dev/null 2>&1 || fail "slurmctld does not answer"
for n in n1 n2; do
  alive "$STATE/slurmd_$n.pid" || slurmd -N "$n" || fail "slurmd -N $n did not start"
done

# ---- wait for two idle nodes ----------------------------------------------------------
deadline=$((SECONDS + TIMEOUT)); resumed=0
until [[ $(sinfo -h -N -p debug -t idle,mix,alloc -o %N 2>/dev/null | sort -u | wc -l) -eq 2 ]]; do
  # A node left DOWN/DRAIN by an earlier config is given one chance to come back.
  if [[ $resumed == 0 ]] && sinfo -h -N -t down,drain -o %N 2>/dev/null | grep -q .; then
    sleep 2; scontrol update nodename=n1,n2 state=resume 2>/dev/null || true; resumed=1
  fi
  ((SECONDS < deadline)) || fail "nodes not idle after ${TIMEOUT}s"
  sleep 1
done

out="$(timeout 60 srun -N2 -n2 -t 1 bash -c 'echo $SLURMD_NODENAME' 2>&1)" \
  || fail "smoke test srun -N2 -n2 failed: $out"
[[ $(sort <<<"$out" | tr '\n' ' ') == "n1 n2 " ]] || fail "smoke test ran on: $out"
echo "up.sh: cluster up ($(sinfo -h -o '%P %D %T' | tr '\n' ' '))"
