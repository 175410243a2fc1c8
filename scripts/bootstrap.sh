#!/usr/bin/env bash
# Install what vpanel needs on a Debian host, once: Debian packages through apt
# (only when root and only those missing), then a .venv with the project in it.
# Re-running it is cheap: every step checks first.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  busybox-static   # the tiny guests the tests and the demo build
  catatonit        # the small static PID 1 of guests without the fakeinit flag
  lxcfs            # guests' own meminfo, cpuinfo, stat, loadavg, uptime (scripts/lxcfs.sh)
  libseccomp2      # seccomp filters, loaded through cffi
  iproute2 procps util-linux
  curl             # the agent API by hand (curl --unix-socket), scripts/agent.sh, tests
  openssl          # root password hashes for guests (openssl passwd -6)
  nftables         # the host-wide rule that drops packets with a forged guest source
  debootstrap      # the 'debootstrap' build method
  gcc libc6-dev    # compile the static /sbin/vreboot (hostagent/guestbin) put into every guest built
  btrfs-progs      # mkfs.btrfs and `btrfs filesystem du` for the vunify tests (loop-mounted btrfs)
  xfsprogs         # mkfs.xfs for the project-quota tests (tests/agent/test_projquota.py)
  python3-venv
  redis-server     # the channel layer of the websocket tests and make run (scripts/redis.sh: a private one)
  chromium         # the browser test (tests/e2e): Playwright drives Debian's build, never its own download
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing Debian packages (install them as root): ${missing[*]}" >&2
  fi
fi

# The group allowed on the agent's socket besides root (docs/agent-api.md):
# the panel's user joins it. A system group with no members changes nothing.
if [ "$(id -u)" -eq 0 ] && ! getent group vpanel >/dev/null && command -v groupadd >/dev/null; then
  groupadd --system vpanel
fi

# Debian's interpreter starts in a quarter of the time of some hand-built ones
# (reference/perf.md), which matters for the command-line tools.
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY=$(command -v python3); fi
fi

stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
