#!/usr/bin/env bash
# Real infrastructure for the tests (adapted from ../shared/infra, tested recipes). Needs root.
#  - sshd on 127.0.0.1:2222, and NETNS_HOSTS network-namespace "hosts" h1..hN
#    (10.200.0.1..N on bridge infrabr0), each with its own sshd and hostname;
#  - Open MPI (Debian's 4.1, with PMIx for `srun --mpi=pmix`); mpi4py comes with pydist's
#    `mpi` extra in the test venv;
#  - Slurm 22.05: partition `debug` (the local node) and `hosts` (nodes h1..hN, one slurmd
#    in each namespace). Open MPI is installed before slurmd starts: slurmd loads libpmix once.
# Idempotent; down.sh undoes it. Keys and client config: $INFRA_DIR/ssh-client/.
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
export INFRA_DIR=${INFRA_DIR:-/tmp/infra} NETNS_HOSTS=${NETNS_HOSTS:-3}
. "$HERE/lib.sh"
apt_install openssh-server openssh-client iproute2 tcsh \
  munge slurmctld slurmd slurm-client openmpi-bin libopenmpi-dev
SSH_PORT=2222 "$HERE/ssh-up.sh"
"$HERE/netns-up.sh"
SLURM_NETNS_NODES=$NETNS_HOSTS "$HERE/slurm-up.sh"
