#!/usr/bin/env bash
# Installs the peers and load tools the benchmarks compare against, from Debian's packages,
# and the chart library into the project's venv. Run as root from the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=()
for tool in wrk iperf3 sockperf socat nginx haproxy taskset; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
[ -x /usr/sbin/docker-proxy ] || need+=(docker-proxy)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    # docker.io ships /usr/sbin/docker-proxy, the reference; nginx-light + the stream module.
    apt-get install -y -qq --no-install-recommends wrk iperf3 sockperf socat nginx-light \
        libnginx-mod-stream haproxy docker.io util-linux >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q . matplotlib
echo "ready: .venv/bin/python benchmarks/bench.py"
