#!/usr/bin/env bash
# Installs the system tools that the slow-link tests need (ip and tc from iproute2, iptables-legacy from iptables)
# where it can: as root, with apt-get. Elsewhere it says why not and exits 0, and those tests skip with that reason.
# With the tools present it does nothing, so the README's test command can run it every time.
set -u
missing=()
{ command -v ip && command -v tc; } >/dev/null || missing+=(iproute2)
command -v iptables-legacy >/dev/null || missing+=(iptables)
[ ${#missing[@]} = 0 ] && exit 0
skip="the slow-link tests will skip (install later with: apt-get install ${missing[*]})"
if [ "$(id -u)" != 0 ]; then
  echo "setup_system: ${missing[*]} not installed: not root; $skip"
elif ! command -v apt-get >/dev/null; then
  echo "setup_system: ${missing[*]} not installed: no apt-get; $skip"
else
  echo "setup_system: apt-get install ${missing[*]}"
  log=$(mktemp)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >"$log" 2>&1; then
    tail -n 5 "$log"
    echo "setup_system: apt-get failed; $skip"
  fi
  rm -f "$log"
fi
exit 0
