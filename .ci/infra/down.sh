#!/usr/bin/env bash
# Stop what up.sh started: Slurm first (its namespace slurmds live in the namespaces), then
# the namespace hosts (and their sshds), then the loopback sshd. Packages stay.
set -uo pipefail
HERE=$(dirname "$(readlink -f "$0")")
export INFRA_DIR=${INFRA_DIR:-/tmp/infra}
"$HERE/slurm-down.sh"
"$HERE/netns-down.sh"
"$HERE/ssh-down.sh"
exit 0
