#!/usr/bin/env bash
# Real SSH infrastructure for the SSHManager tests (adapted from ../shared/infra, tested
# recipes): sshd on 127.0.0.1:2222, and NETNS_HOSTS network-namespace "hosts" h1..hN
# (10.200.0.1..N on bridge infrabr0), each with its own sshd and hostname. Needs root.
# Idempotent; down.sh undoes it. Keys and client config: $INFRA_DIR/ssh-client/.
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
export INFRA_DIR=${INFRA_DIR:-/tmp/infra} NETNS_HOSTS=${NETNS_HOSTS:-3}
. "$HERE/lib.sh"
apt_install openssh-server openssh-client iproute2 tcsh
SSH_PORT=2222 "$HERE/ssh-up.sh"
"$HERE/netns-up.sh"
