#!/usr/bin/env bash
# Start a private OpenSSH server (no systemd) that accepts key-only logins.
# Idempotent: installs only what is missing, reuses keys, and does nothing if
# this instance already runs.
#
# Environment (all optional):
#   SSH_PORT=2222              port to listen on
#   SSH_LISTEN=127.0.0.1       space-separated listen addresses
#   SSH_NETNS=                 run sshd inside this network namespace
#   INFRA_DIR=/tmp/infra       where all state lives
#   SSH_SETUP_USER_KEY=1       also create ~/.ssh/id_ed25519 if the caller has
#                              no key, and authorize it, so that plain
#                              `ssh -p 2222 localhost` works
#   SSH_TEST_USER=             also create this unprivileged user (key-only)
#   SSH_HOSTNAME=              run sshd in its own UTS namespace with this
#                              hostname (what `hostname` says in sessions)
#
# Results:
#   $INFRA_DIR/ssh-client/id_ed25519   client key authorized on every instance
#   $INFRA_DIR/ssh-client/config       `ssh -F` file: that key, no host-key
#                                      prompts, BatchMode, quiet
#   $INFRA_DIR/sshd-<ns|root>-<port>/  sshd_config, host key, sshd.pid, sshd.log
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/lib.sh"

HOME=${HOME:-$(getent passwd "$(id -un)" | cut -d: -f6)}
SSH_PORT=${SSH_PORT:-2222}
SSH_LISTEN=${SSH_LISTEN:-127.0.0.1}
SSH_NETNS=${SSH_NETNS:-}
INFRA_DIR=${INFRA_DIR:-/tmp/infra}
SSH_SETUP_USER_KEY=${SSH_SETUP_USER_KEY:-1}
SSH_TEST_USER=${SSH_TEST_USER:-}
SSH_HOSTNAME=${SSH_HOSTNAME:-}

t0=$(now_ms)
apt_install openssh-server openssh-client
t1=$(now_ms)

CLIENT=$INFRA_DIR/ssh-client
STATE=$INFRA_DIR/sshd-${SSH_NETNS:-root}-$SSH_PORT
mkdir -p "$CLIENT" "$STATE"
chmod 755 "$INFRA_DIR" "$STATE"
chmod 700 "$CLIENT"

# sshd refuses to start without its privilege-separation directory, which
# systemd-tmpfiles would normally create.
mkdir -p /run/sshd && chmod 755 /run/sshd

# --- keys -----------------------------------------------------------------
[ -f "$CLIENT/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C infra-client -f "$CLIENT/id_ed25519"
[ -f "$STATE/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C infra-host -f "$STATE/ssh_host_ed25519_key"

if [ "$SSH_SETUP_USER_KEY" = 1 ]; then
    mkdir -p "$HOME/.ssh" && chmod 700 "$HOME/.ssh"
    have_key=0
    for k in "$HOME"/.ssh/id_{ed25519,ecdsa,rsa}; do [ -f "$k" ] && have_key=1; done
    if [ "$have_key" = 0 ]; then
        ssh-keygen -q -t ed25519 -N '' -C "infra-$(id -un)" -f "$HOME/.ssh/id_ed25519"
    fi
fi

# One authorized_keys file, outside any home dir (StrictModes is off because
# /tmp is world-writable), shared by every user and every instance.
AK=$INFRA_DIR/authorized_keys
touch "$AK" && chmod 644 "$AK"
for pub in "$CLIENT/id_ed25519.pub" "$HOME"/.ssh/id_{ed25519,ecdsa,rsa}.pub; do
    [ -f "$pub" ] || continue
    grep -qxF "$(cat "$pub")" "$AK" || cat "$pub" >> "$AK"
done

# --- client config ----------------------------------------------------------
cat > "$CLIENT/config" <<EOF
# ssh -F $CLIENT/config [-p PORT] HOST ...
Host *
    IdentityFile $CLIENT/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
    ConnectTimeout 10
    ServerAliveInterval 15
EOF
chmod 600 "$CLIENT/config"

# --- optional unprivileged user ----------------------------------------------
if [ -n "$SSH_TEST_USER" ] && ! id "$SSH_TEST_USER" >/dev/null 2>&1; then
    useradd -m -s /bin/bash "$SSH_TEST_USER"
    # useradd leaves the password field '!' (locked); with UsePAM no, sshd
    # rejects locked accounts even for key logins. '*' = no password, not locked.
    usermod -p '*' "$SSH_TEST_USER"
fi

# --- server config -------------------------------------------------------------
{
    echo "Port $SSH_PORT"
    for a in $SSH_LISTEN; do echo "ListenAddress $a"; done
    cat <<EOF
HostKey $STATE/ssh_host_ed25519_key
PidFile $STATE/sshd.pid
AuthorizedKeysFile $AK .ssh/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitUserEnvironment no
AcceptEnv LANG LC_* PYTHON* INFRA_* PYDIST_*
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
PrintLastLog no
UseDNS no
# Launchers open many connections at once (Julia's max_parallel=10 equals the
# stock MaxStartups 10:30:100, beyond which sshd drops connections at random).
MaxStartups 200
# Sessions per multiplexed (ControlMaster) connection; stock default is 10.
MaxSessions 200
LogLevel VERBOSE
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
} > "$STATE/sshd_config.new"
mv "$STATE/sshd_config.new" "$STATE/sshd_config"

NSX=()
[ -n "$SSH_NETNS" ] && NSX=(ip netns exec "$SSH_NETNS")
# Optional own hostname (UTS namespace) so that `ssh h1 hostname` says h1.
[ -n "$SSH_HOSTNAME" ] && NSX+=(unshare --uts -- sh -c 'hostname "$0" && exec "$@"' "$SSH_HOSTNAME")

if pid_alive "$STATE/sshd.pid" sshd; then
    log "sshd ${SSH_NETNS:-root}:$SSH_PORT already running (pid $(cat "$STATE/sshd.pid"))"
    exit 0
fi

first=${SSH_LISTEN%% *}
if wait_tcp "$first" "$SSH_PORT" 0 "$SSH_NETNS"; then
    die "port $first:$SSH_PORT is taken by a process this script did not start"
fi

/usr/sbin/sshd -t -f "$STATE/sshd_config"
t2=$(now_ms)
# sshd must be started by absolute path (it re-execs itself). Without -D it
# daemonizes and writes PidFile; -E sends its log to a file.
"${NSX[@]}" /usr/sbin/sshd -f "$STATE/sshd_config" -E "$STATE/sshd.log"
wait_tcp "$first" "$SSH_PORT" 20 "$SSH_NETNS" || { tail "$STATE/sshd.log" >&2; die "sshd did not come up"; }
for i in $(seq 50); do pid_alive "$STATE/sshd.pid" sshd && break; sleep 0.1; done
t3=$(now_ms)
log "sshd ${SSH_NETNS:-root} $SSH_LISTEN:$SSH_PORT up (pid $(cat "$STATE/sshd.pid")); install $((t1 - t0)) ms, start $((t3 - t2)) ms"
log "try: ssh -F $CLIENT/config -p $SSH_PORT $first true"
