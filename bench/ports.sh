# Sourced by the benchmark scripts: free ports and waiting for a listener on 127.0.0.1.
# The caller may set `me` (its name, for messages) before sourcing.
# shellcheck shell=bash
me=${me:-bench}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port nothing answers on, of 100 random tries; below Linux's ephemeral range
# (32768-60999), where a client connection's local port would make the bind fail.
pick_port() {
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 12000))
    answers "$p" || { echo "$p"; return; }
  done
  echo "$me: no free port" >&2; exit 1
}

wait_port() { # port, what: up to 10 s
  for _ in $(seq 100); do answers "$1" && return 0; sleep 0.1; done
  echo "$me: $2 is not answering on 127.0.0.1:$1" >&2; exit 1
}
