"""HTTP keep-alive through four relays in one run, rounds alternated (A B C D A B C D ...).

wrk -t1 -c50 and an nginx `return 200` backend on CPU 1, each proxy pinned to CPU 0. CPU from
/proc/PID/stat (whole process, all threads), kworker threads (the sockmap backlog runs there),
and /proc/stat per-CPU busy time (everything on the box, other engineers' tests included).
Loopback only; every run finite.  usage: bench.py ROUNDS SECONDS
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TMP = os.path.join(HERE, "tmp")
PY = "/work/venv/bin/python"
TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening")


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK  # utime + stime, seconds


def tree_cpu(pid: int) -> float:
    total = proc_cpu(pid)
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    except OSError:
        kids = []
    return total + sum(tree_cpu(int(k)) for k in kids)


def ctxt(pid: int) -> int:
    n = 0
    for line in open(f"/proc/{pid}/status"):
        if "ctxt_switches" in line:
            n += int(line.split()[1])
    return n


def kworker_cpu() -> float:
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index("(") + 1:data.rindex(")")]
        if comm.startswith("kworker") or comm.startswith("ksoftirqd"):
            fields = data.rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / TCK


def cpu_busy() -> dict[str, float]:
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if re.match(r"cpu\d", line):
                name, *v = line.split()
                v = list(map(int, v))
                out[name] = (sum(v[:8]) - v[3] - v[4]) / TCK  # minus idle, iowait
                out[name + "_softirq"] = v[6] / TCK
    return out


def main() -> None:
    rounds, seconds = int(sys.argv[1]), int(sys.argv[2])
    bport = free_port()
    conf = os.path.join(TMP, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {TMP}/nginx.pid; error_log /dev/null crit;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{bport} backlog=4096; location / {{ return 200 "ok"; }} }} }}
""")
    procs = {}
    nginx = subprocess.Popen(["taskset", "-c", "1", "nginx", "-c", conf, "-p", TMP])
    wait_port(bport)
    peers = {}
    cmds = {
        "copy": lambda p: [PY, os.path.join(HERE, "relay.py"), "copy", str(p), str(bport)],
        "sockmap": lambda p: [PY, os.path.join(HERE, "relay.py"), "sockmap", str(p), str(bport)],
        "sockmap-raw": lambda p: [PY, os.path.join(HERE, "rawrelay.py"), str(p), str(bport)],
        "sockmap-epollin": lambda p: ["env", "EPOLLIN_WAKEUPS=1", PY, os.path.join(HERE, "relay.py"), "sockmap", str(p), str(bport)],
        "docker-proxy": lambda p: ["/usr/sbin/docker-proxy", "-proto", "tcp", "-host-ip", "127.0.0.1",
                                   "-host-port", str(p), "-container-ip", "127.0.0.1", "-container-port", str(bport)],
        "pyproxy": lambda p: ["/work/venv/bin/pyproxy", "-proto", "tcp", "-host-ip", "127.0.0.1",
                              "-host-port", str(p), "-container-ip", "127.0.0.1", "-container-port", str(bport)],
    }
    only = os.environ.get("PEERS", "copy,sockmap-raw,sockmap,docker-proxy,pyproxy").split(",")
    try:
        for name in only:
            port = free_port()
            env = {**os.environ, "PYPROXY_ENGINE_SOCKET": ""}
            if name in ("docker-proxy", "pyproxy"):  # they want a status pipe on fd 3
                rd, wr = os.pipe()
                procs[name] = subprocess.Popen(["taskset", "-c", "0", *cmds[name](port)], env=env, pass_fds=(3,),
                                               preexec_fn=lambda wr=wr: os.dup2(wr, 3),
                                               stdout=subprocess.DEVNULL, stderr=open(os.path.join(TMP, name + ".err"), "w"))
                os.close(wr)
                status = os.read(rd, 4096); os.close(rd)
                assert status == b"0\n", (name, status)
            else:
                procs[name] = subprocess.Popen(["taskset", "-c", "0", *cmds[name](port)], env=env,
                                               stdout=subprocess.DEVNULL, stderr=open(os.path.join(TMP, name + ".err"), "w"))
            peers[name] = port
            try:
                wait_port(port)
            except RuntimeError:
                raise RuntimeError(f"{name}: " + open(os.path.join(TMP, name + ".err")).read()[-2000:]) from None
        results: dict[str, list[dict]] = {n: [] for n in peers}
        for r in range(rounds):
            for name, port in peers.items():
                pid = procs[name].pid
                before = (tree_cpu(pid), tree_cpu(nginx.pid), kworker_cpu(), cpu_busy(), time.monotonic(), ctxt(pid))
                wrk = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c50", f"-d{seconds}s", "--latency",
                                      f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 30)
                after = (tree_cpu(pid), tree_cpu(nginx.pid), kworker_cpu(), cpu_busy(), time.monotonic(), ctxt(pid))
                out = wrk.stdout
                if "requests in" not in out:
                    raise RuntimeError(f"{name}: wrk failed: {out} {wrk.stderr} relay stderr: " + open(os.path.join(TMP, name + ".err")).read()[-3000:] + f" alive={procs[name].poll()}")
                reqs = int(re.search(r"(\d+) requests in", out).group(1))
                lat = {q: re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)", out) for q in ("50", "99")}
                def us(m):  # noqa: ANN001
                    v = float(m.group(1)); return v * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
                errors = re.search(r"Non-2xx.*|Socket errors.*", out)
                row = {
                    "round": r, "requests": reqs, "rps": reqs / (after[4] - before[4]),
                    "p50_us": us(lat["50"]), "p99_us": us(lat["99"]),
                    "proxy_us": (after[0] - before[0]) / reqs * 1e6,
                    "nginx_us": (after[1] - before[1]) / reqs * 1e6,
                    "kworker_us": (after[2] - before[2]) / reqs * 1e6,
                    "cpu0_us": (after[3]["cpu0"] - before[3]["cpu0"]) / reqs * 1e6,
                    "cpu1_us": (after[3]["cpu1"] - before[3]["cpu1"]) / reqs * 1e6,
                    "softirq_us": sum(after[3][f"cpu{i}_softirq"] - before[3][f"cpu{i}_softirq"] for i in (0, 1)) / reqs * 1e6,
                    "errors": errors.group(0) if errors else "",
                    "proxy_cs_per_req": (after[5] - before[5]) / reqs,
                }
                row["system_us"] = row["cpu0_us"] + row["cpu1_us"]
                results[name].append(row)
                print(f"round {r} {name:13s} {row['rps']:8.0f} req/s p50 {row['p50_us']:6.0f} us p99 {row['p99_us']:6.0f} us | "
                      f"proxy {row['proxy_us']:5.2f} kworker {row['kworker_us']:5.2f} nginx {row['nginx_us']:5.2f} "
                      f"cpu0 {row['cpu0_us']:5.2f} cpu1 {row['cpu1_us']:5.2f} (softirq {row['softirq_us']:4.2f}) "
                      f"both {row['system_us']:5.2f} us/req; proxy ctx switches/req {row['proxy_cs_per_req']:.3f} {row['errors']}", flush=True)
        with open(os.path.join(HERE, f"bench-{time.strftime('%H%M%S')}.json"), "w") as f:
            json.dump(results, f, indent=1)
        print("\nmedians (us per request unless noted)")
        keys = ["rps", "p50_us", "p99_us", "proxy_us", "kworker_us", "nginx_us", "cpu0_us", "cpu1_us", "system_us", "proxy_cs_per_req"]
        print(f"{'peer':13s} " + " ".join(f"{k:>10s}" for k in keys))
        med = {}
        for name, rows in results.items():
            med[name] = {k: sorted(x[k] for x in rows)[len(rows) // 2] for k in keys}
            print(f"{name:13s} " + " ".join(f"{med[name][k]:10.2f}" for k in keys))
        if "docker-proxy" in med:
            print("\nratios to docker-proxy (medians; per-round ratios in the JSON rows)")
            for name in med:
                print(f"{name:13s} " + " ".join(f"{med[name][k] / med['docker-proxy'][k]:10.2f}" if med['docker-proxy'][k] else f"{'-':>10s}" for k in keys))
    finally:
        for p in list(procs.values()) + [nginx]:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
