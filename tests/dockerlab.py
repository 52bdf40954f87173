"""A private Docker daemon for end-to-end tests: containerd and dockerd with every socket,
data and exec directory under one temporary directory, a bridge of our own on
198.18.100.0/24, no iptables rules (so loopback traffic can only go through the userland
proxy), and pyproxy as --userland-proxy-path. Images come from `docker import`, no registry.
Everything it starts or creates is stopped (by pid) and removed on close.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

BUSYBOX = "/bin/busybox"
DNSMASQ = "/usr/sbin/dnsmasq"


def apt_mirror() -> str:
    """The Debian mirror this machine's apt is set up with (we name none of our own)."""
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        try:
            with open(path) as f:
                lines = f.readlines()
            for line in lines:
                words = line.split()
                if words[:1] == ["URIs:"]:
                    return words[1]
                if words[:1] == ["deb"] and "security" not in line:
                    return next(w for w in words[1:] if "://" in w)
        except (OSError, StopIteration):
            continue
    raise RuntimeError("no Debian mirror in apt's sources")


def docker_available() -> bool:
    return all(shutil.which(t) for t in ("dockerd", "containerd", "runc", "docker")) and \
        os.path.exists(BUSYBOX) and os.geteuid() == 0


class DockerLab:
    def __init__(self, proxy_path: str, env: dict[str, str] | None = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="pyproxy-dockerd-")
        self.sock = os.path.join(self.tmp, "docker.sock")
        self.bridge = f"ppbr{os.getpid() % 100000}"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, **(env or {})}
        try:
            self._start(proxy_path)
        except BaseException:
            self.close()
            raise

    def _start(self, proxy_path: str) -> None:
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", "198.18.100.1/24", "dev", self.bridge], check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        t = self.tmp
        containerd_sock = os.path.join(t, "containerd.sock")
        self._spawn(["containerd", "--address", containerd_sock, "--root", f"{t}/containerd-root",
                     "--state", f"{t}/containerd-state"], "containerd.log")
        self._wait(lambda: os.path.exists(containerd_sock), "containerd")
        self._spawn(["dockerd", "--host", f"unix://{self.sock}", "--containerd", containerd_sock,
                     "--data-root", f"{t}/docker", "--exec-root", f"{t}/exec",
                     "--pidfile", f"{t}/docker.pid", "--storage-driver", "vfs",
                     "--bridge", self.bridge, "--iptables=false", "--ip-masq=false",
                     "--ip6tables=false", "--userland-proxy-path", proxy_path], "dockerd.log")
        self._wait(lambda: self.docker("info", check=False).returncode == 0, "dockerd")

    def _spawn(self, cmd: list[str], log: str) -> None:
        # The child writes through its own copy of the descriptor: ours can close at once.
        with open(os.path.join(self.tmp, log), "wb") as out:
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                               env=self.env, start_new_session=True))

    def _wait(self, ready, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{what} did not start; see {self.tmp}")
            time.sleep(0.2)

    def docker(self, *args: str, check: bool = True, timeout: float = 120,
               input: bytes | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(["docker", "-H", f"unix://{self.sock}", *args], capture_output=True,
                              timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])}: {done.stderr.decode(errors='replace')}"
                               f"{done.stdout.decode(errors='replace')[-2000:]}")
        return done

    def import_rootfs(self, tag: str, files: dict[str, str], extra: dict[str, bytes] | None = None,
                      links: dict[str, str] | None = None) -> None:
        """An image from host files (path in image -> host path), without a registry."""
        root = tempfile.mkdtemp(dir=self.tmp)
        os.chmod(root, 0o755)  # the image's "/": mkdtemp's 0700 would lock out non-root users
        for dest, src in files.items():
            os.makedirs(os.path.dirname(root + dest), exist_ok=True)
            shutil.copy(src, root + dest, follow_symlinks=True)
        for dest, data in (extra or {}).items():
            os.makedirs(os.path.dirname(root + dest), exist_ok=True)
            with open(root + dest, "wb") as f:
                f.write(data)
        for dest, target in (links or {}).items():
            os.symlink(target, root + dest)
        tar = subprocess.run(["tar", "-C", root, "-c", "."], capture_output=True, check=True).stdout
        self.docker("import", "-", tag, input=tar)

    def import_busybox(self, tag: str = "pp-busybox:test") -> None:
        self.import_rootfs(tag, {"/bin/busybox": BUSYBOX},
                           {"/www/index.html": b"hello from the container\n"},
                           {f"/bin/{a}": "busybox" for a in ("sh", "httpd", "sleep")})

    def import_dnsmasq(self, tag: str = "pp-dnsmasq:test") -> None:
        libs = subprocess.run(["ldd", DNSMASQ], capture_output=True, text=True, check=True).stdout
        files = {DNSMASQ: DNSMASQ}
        for word in libs.split():
            if word.startswith("/"):
                files[word] = word
        self.import_rootfs(tag, files, {"/etc/passwd": b"root:x:0:0:root:/:/bin/sh\n",
                                        "/etc/group": b"root:x:0:\n"})

    def import_debian_python(self, tag: str = "pp-python:bookworm") -> None:
        """A Debian base with python3 and venv: debootstrap from the mirror apt already uses."""
        cache = "/var/tmp/pyproxy-debian-python.tar"  # reused by later runs on this machine
        if not os.path.exists(cache):
            root = tempfile.mkdtemp(dir=self.tmp)
            os.chmod(root, 0o755)  # the image's "/": mkdtemp's 0700 would lock out non-root users
            subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
                            "bookworm", root, apt_mirror()], check=True, capture_output=True,
                           timeout=900)
            subprocess.run(["sh", "-c", f"rm -rf {root}/var/cache/apt/archives/*.deb "
                            f"{root}/var/lib/apt/lists/*"], check=True)
            subprocess.run(["tar", "-C", root, "-cf", cache + ".part", "."], check=True)
            os.rename(cache + ".part", cache)
        with open(cache, "rb") as f:
            self.docker("import", "-", tag, input=f.read(), timeout=300)

    def close(self) -> None:
        try:
            ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                self.docker("rm", "-f", *[i.decode() for i in ids], check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for proc in reversed(self.procs):  # dockerd first, then containerd
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        subprocess.run(["umount", "-R", self.tmp], capture_output=True)  # leftover mounts, if any
        shutil.rmtree(self.tmp, ignore_errors=True)
