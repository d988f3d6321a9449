#!/usr/bin/env bash
# Stop what up.sh started: the namespace hosts (and their sshds), then the loopback sshd.
set -uo pipefail
HERE=$(dirname "$(readlink -f "$0")")
export INFRA_DIR=${INFRA_DIR:-/tmp/infra}
"$HERE/netns-down.sh"
"$HERE/ssh-down.sh"
exit 0
