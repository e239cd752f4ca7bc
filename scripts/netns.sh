#!/usr/bin/env bash
# A NAT testbed in Linux network namespaces, for fmi's NAT traversal (docs/nat.md).
#
#   scripts/netns.sh up   PREFIX MODE_A MODE_B   build the testbed (needs root, ip, iptables)
#   scripts/netns.sh down PREFIX                 remove every namespace of the testbed
#   scripts/netns.sh exec PREFIX NODE CMD...     run CMD in NODE's namespace (srv | a | b)
#   scripts/netns.sh check                       exit 0 if namespaces and iptables NAT work here
#                                                (installs iproute2 and iptables with apt-get if
#                                                they are missing)
#
# MODE is one of: none (the function sits on the "internet" itself), cone (behind a
# MASQUERADE NAT that keeps ports and drops unsolicited inbound traffic: endpoint-independent
# mapping, TCP hole punching works) or symmetric (MASQUERADE --random-fully: a new public port
# per destination, punching cannot work).
#
#            PREFIX-inet: bridge "inet0" = the internet, 203.0.113.0/24
#        ┌───────────────────────┼───────────────────────┐
#   PREFIX-srv               PREFIX-nat-a              PREFIX-nat-b
#   203.0.113.1, .2          wan 203.0.113.11          wan 203.0.113.12
#   (rendezvous, STUN)       lan 192.0.2.1/24          lan 198.51.100.1/24
#                                 │                         │
#                            PREFIX-a 192.0.2.10       PREFIX-b 198.51.100.10
#   (mode none: PREFIX-a is 203.0.113.21 and PREFIX-b 203.0.113.22 on the bridge, no NAT)
#
# The server namespace has two addresses so that a STUN server (coturn) listening on both lets a
# client compare the mappings two destinations see (endpoint-independent or not).
#
# Only documentation ranges are used, and the namespaces have no link to the host's network:
# nothing sent inside can leave them. Keep PREFIX short (namespace names carry it).
set -euo pipefail

SRV_IP=203.0.113.1
SRV_IP2=203.0.113.2

die() { echo "netns.sh: $*" >&2; exit 1; }

ns() { echo "$1-$2"; }

in_ns() { local n="$1"; shift; ip netns exec "$n" "$@"; }

# veth pair with one end in each namespace.
veth() { # ns1 name1 ns2 name2
    ip link add name "$2" netns "$1" type veth peer name "$4" netns "$3"
}

add_ns() {
    ip netns add "$1"
    in_ns "$1" ip link set lo up
}

# Attach namespace $2 to the internet bridge of prefix $1 as interface $3 with address $4.
on_internet() { # prefix ns ifname addr/len
    local inet; inet="$(ns "$1" inet)"
    local port="p${RANDOM}"
    veth "$2" "$3" "$inet" "$port"
    in_ns "$inet" ip link set "$port" master inet0 up
    in_ns "$2" ip addr add "$4" dev "$3"
    in_ns "$2" ip link set "$3" up
}

function_node() { # prefix side mode lan_prefix
    local prefix="$1" side="$2" mode="$3" lan="$4"
    local node; node="$(ns "$prefix" "$side")"
    add_ns "$node"
    if [ "$mode" = none ]; then
        local host=21
        [ "$side" = b ] && host=22
        on_internet "$prefix" "$node" eth0 "203.0.113.$host/24"
        return
    fi
    local nat; nat="$(ns "$prefix" "nat-$side")"
    local wan=11
    [ "$side" = b ] && wan=12
    add_ns "$nat"
    on_internet "$prefix" "$nat" wan "203.0.113.$wan/24"
    veth "$nat" lan "$node" eth0
    in_ns "$nat" ip addr add "$lan.1/24" dev lan
    in_ns "$nat" ip link set lan up
    in_ns "$node" ip addr add "$lan.10/24" dev eth0
    in_ns "$node" ip link set eth0 up
    in_ns "$node" ip route add default via "$lan.1"
    in_ns "$nat" sysctl -qw net.ipv4.ip_forward=1
    local random=()
    [ "$mode" = symmetric ] && random=(--random-fully)
    in_ns "$nat" iptables -t nat -A POSTROUTING -o wan -j MASQUERADE "${random[@]}"
    # Unsolicited inbound traffic is dropped silently (no reset), as real NATs do.
    for chain in FORWARD INPUT; do
        in_ns "$nat" iptables -A "$chain" -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
        in_ns "$nat" iptables -A "$chain" -i wan -j DROP
    done
}

up() { # prefix mode_a mode_b
    local prefix="$1" mode_a="$2" mode_b="$3"
    for m in "$mode_a" "$mode_b"; do
        case "$m" in none|cone|symmetric) ;; *) die "unknown mode $m" ;; esac
    done
    local inet; inet="$(ns "$prefix" inet)"
    add_ns "$inet"
    in_ns "$inet" ip link add name inet0 type bridge
    in_ns "$inet" ip link set inet0 up
    local srv; srv="$(ns "$prefix" srv)"
    add_ns "$srv"
    on_internet "$prefix" "$srv" eth0 "$SRV_IP/24"
    in_ns "$srv" ip addr add "$SRV_IP2/24" dev eth0
    function_node "$prefix" a "$mode_a" 192.0.2
    function_node "$prefix" b "$mode_b" 198.51.100
}

down() { # prefix
    local prefix="$1" n
    for n in a b nat-a nat-b srv inet; do
        # Processes still inside keep a namespace alive only as long as they run; the name
        # goes at once.
        ip netns del "$(ns "$prefix" "$n")" 2>/dev/null || true
    done
}

check() {
    [ "$(id -u)" = 0 ] || die "network namespaces need root"
    if ! command -v ip >/dev/null || ! command -v iptables >/dev/null; then
        # A fresh CI machine: install what the testbed needs (Debian packages).
        if command -v apt-get >/dev/null; then
            echo "netns.sh: installing iproute2 and iptables" >&2
            { apt-get install -y iproute2 iptables || { apt-get update && apt-get install -y iproute2 iptables; }; } \
                >/dev/null 2>&1 || true
        fi
    fi
    command -v ip >/dev/null || die "ip (iproute2) is not installed (apt-get install -y iproute2)"
    command -v iptables >/dev/null || die "iptables is not installed (apt-get install -y iptables)"
    local probe="fmichk$$"
    ip netns add "$probe" || die "cannot create a network namespace"
    if ! ip netns exec "$probe" iptables -t nat -L >/dev/null 2>&1; then
        ip netns del "$probe"
        die "iptables NAT does not work inside a namespace here"
    fi
    ip netns del "$probe"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    up) [ $# -eq 3 ] || die "usage: up PREFIX MODE_A MODE_B"; check; up "$@" ;;
    down) [ $# -eq 1 ] || die "usage: down PREFIX"; down "$1" ;;
    exec) [ $# -ge 3 ] || die "usage: exec PREFIX NODE CMD..."; p="$1"; n="$2"; shift 2
          exec ip netns exec "$(ns "$p" "$n")" "$@" ;;
    check) check ;;
    *) die "usage: $0 up|down|exec|check ..." ;;
esac
