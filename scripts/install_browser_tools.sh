#!/usr/bin/env bash
# Debian's headless browser and Prometheus, for scripts/dashboard_check.py (the Ray dashboard and the
# run's metrics checked as a user sees them). Debian/Ubuntu only; needs root (or sudo).
#
#   scripts/install_browser_tools.sh          # installs `chromium` and `prometheus` if missing
#
# Debian's prometheus package also installs a systemd service; on a machine with systemd it starts
# one on :9090 that scrapes nothing of ours. dashboard_check.py runs its own Prometheus on a free
# loopback port with Ray's scrape config, so the service can be stopped (`systemctl disable --now prometheus`).
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v prometheus >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -eq 0 ]; then
    echo "chromium and prometheus are installed: $(chromium --version 2>/dev/null | tail -1); $(prometheus --version 2>&1 | head -1)"
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "needs root to install ${missing[*]} (apt-get)" >&2; exit 1; }
    sudo=sudo
fi
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${missing[@]}"   # with recommends: chromium's fonts
