"""Is the sockmap relay woken during keep-alive load? syscall summary of the relay for 2 s."""
import os, signal, socket, subprocess, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
def fp():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
b, p = fp(), fp()
conf = f"{HERE}/tmp/ng2.conf"
open(conf, "w").write(f"""worker_processes 1; daemon off; pid {HERE}/tmp/ng2.pid; error_log /dev/null crit;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{b} backlog=4096; location / {{ return 200 "ok"; }} }} }}""")
ng = subprocess.Popen(["taskset", "-c", "1", "nginx", "-c", conf, "-p", f"{HERE}/tmp"])
env = {**os.environ, **({"EPOLLIN_WAKEUPS": "1"} if "epollin" in sys.argv else {})}
rl = subprocess.Popen(["taskset", "-c", "0", "/work/venv/bin/python", f"{HERE}/relay.py", "sockmap", str(p), str(b)], env=env,
                      stdout=subprocess.DEVNULL)
time.sleep(1.5)
wrk = subprocess.Popen(["taskset", "-c", "1", "wrk", "-t1", "-c50", "-d5s", f"http://127.0.0.1:{p}/"], stdout=subprocess.PIPE, text=True)
time.sleep(1.5)
tr = subprocess.run(["timeout", "5", "perf", "trace", "-s", "-p", str(rl.pid), "--", "sleep", "1"], capture_output=True, text=True)
subprocess.run(["timeout", "5", "perf", "record", "-q", "-o", f"{HERE}/tmp/wake.data", "-e", "sched:sched_waking", "--filter", f"pid == {rl.pid}", "-a", "-g", "--", "sleep", "1"], capture_output=True)
rep = subprocess.run(["perf", "report", "-i", f"{HERE}/tmp/wake.data", "--stdio", "--no-children", "-G", "--percent-limit", "5"], capture_output=True, text=True).stdout
print("\n".join(l for l in rep.splitlines() if l.strip() and not l.startswith("#"))[:4000])
out = wrk.communicate(timeout=20)[0]
print([l for l in out.splitlines() if "requests in" in l])
print("\n".join(l for l in (tr.stdout + tr.stderr).splitlines() if l.strip())[:3000])
for x in (rl, ng):
    x.send_signal(signal.SIGTERM); x.wait(5)
