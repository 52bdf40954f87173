"""A throwaway virtual machine with SCTP, for the SCTP tests on hosts whose kernel has none.

The guest boots Debian's own kernel (fetched with `apt-get download`) under qemu, loads the
sctp module from an initramfs built with busybox, and mounts this machine's root filesystem
read-only over virtio-9p: the tests run with the same interpreter, packages and checkout as
on the host, against a kernel that has SCTP. Only loopback exists inside; the guest has no
network device. Writable scratch is a tmpfs on /run. The console is the guest's only output;
its last line carries the command's exit code.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import tempfile

from attrs import frozen

BUSYBOX = "/bin/busybox"  # Debian's busybox-static: runs in an initramfs with no libc
QEMU = "qemu-system-x86_64"
EXIT_MARK = "pyproxy-vm-exit"
# The modules the guest needs (their dependencies follow from each module's own `depends=`):
# the virtio transport and 9p for the host's root, then SCTP. crc32c_generic comes first:
# libcrc32c asks the crypto API for crc32c when it loads, and there is no modprobe in the
# initramfs to fetch it on demand.
MODULES = ["virtio_pci", "9pnet_virtio", "9p", "crc32c_generic", "sctp"]
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do
    insmod /modules/$m.ko || echo "insmod $m failed"
done
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mount -t tmpfs run /host/run
mkdir -p /host/run/tmp
cp /run.sh /host/run/run.sh
ip link set lo up
chroot /host /bin/sh /run/run.sh
echo "{mark} $?"
poweroff -f
""".replace("{mark}", EXIT_MARK)


def kernel_has_sctp() -> bool:
    """Whether this machine's own kernel has SCTP (then no VM is needed)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
        return True
    except OSError:
        return False


def available() -> str | None:
    """Why the VM can't run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (apt-get download into a cache, qemu with /dev/kvm)"
    for tool in (QEMU, "apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian: qemu-system-x86, apt, dpkg)"
    if not os.path.exists(BUSYBOX):
        return f"needs {BUSYBOX} (Debian: busybox-static)"
    return None


@frozen
class Kernel:
    """Debian's kernel image and the modules the guest loads, unpacked in `root`."""

    root: str
    release: str

    @property
    def image(self) -> str:
        return os.path.join(self.root, "boot", f"vmlinuz-{self.release}")

    def modules(self) -> dict[str, str]:
        """Every module file of this kernel, by module name ('-' in file names reads '_')."""
        base = os.path.join(self.root, "lib", "modules", self.release, "kernel")
        return {f.removesuffix(".ko").replace("-", "_"): os.path.join(folder, f)
                for folder, _, files in os.walk(base) for f in files if f.endswith(".ko")}

    def load_order(self, wanted: list[str]) -> list[tuple[str, str]]:
        """(name, path) of `wanted` and everything they depend on, dependencies first.
        A name with no module file is built into the kernel and needs no loading."""
        files = self.modules()
        order: list[tuple[str, str]] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen or name not in files:
                return
            seen.add(name)
            for dep in _depends(files[name]):
                visit(dep)
            order.append((name, files[name]))

        for name in wanted:
            visit(name)
        return order

    @classmethod
    def fetch(cls, cache: str) -> Kernel:
        """Debian's current kernel package (what `linux-image-amd64` depends on), downloaded
        and unpacked once into `cache`."""
        depends = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], check=True,
                                 capture_output=True, text=True, timeout=60).stdout
        package = next(line.split()[-1] for line in depends.splitlines()
                       if line.strip().startswith("Depends: linux-image-"))
        release = package.removeprefix("linux-image-")
        root = os.path.join(cache, package)
        if not os.path.exists(os.path.join(root, "boot", f"vmlinuz-{release}")):
            os.makedirs(cache, exist_ok=True)
            download = tempfile.mkdtemp(dir=cache)
            try:
                # apt's sandbox user can't write to our cache; downloading as root is fine here
                subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                                package], cwd=download, check=True, capture_output=True,
                               timeout=600)
                deb = next(f for f in os.listdir(download) if f.endswith(".deb"))
                subprocess.run(["dpkg", "-x", os.path.join(download, deb), root + ".part"],
                               check=True, timeout=600)
                os.replace(root + ".part", root)
            finally:
                shutil.rmtree(download, ignore_errors=True)
                shutil.rmtree(root + ".part", ignore_errors=True)
        return cls(root, release)


def _depends(path: str) -> list[str]:
    """The `depends=` entry of a module's .modinfo section: the modules it needs loaded first."""
    with open(path, "rb") as f:
        data = f.read()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + len(b"\0depends="):data.index(b"\0", at + 1)].decode()
    return [d.replace("-", "_") for d in value.split(",") if d]


@frozen
class Result:
    exit_code: int | None  # None: the guest never reported one (it crashed or timed out)
    console: str


def build_initramfs(kernel: Kernel, script: str, dest: str) -> None:
    """A gzipped newc cpio with busybox, the modules, /init and the command script."""
    tree = tempfile.mkdtemp(prefix="pyproxy-initramfs-")
    try:
        for d in ("bin", "proc", "sys", "dev", "modules"):
            os.makedirs(os.path.join(tree, d))
        shutil.copy(BUSYBOX, os.path.join(tree, "bin", "busybox"))
        order = []
        for name, path in kernel.load_order(MODULES):
            shutil.copy(path, os.path.join(tree, "modules", f"{name}.ko"))
            order.append(name)
        with open(os.path.join(tree, "modules", "order"), "w") as f:
            f.write("\n".join(order) + "\n")
        for name, text in (("init", INIT), ("run.sh", script)):
            with open(os.path.join(tree, name), "w") as f:
                f.write(text)
            os.chmod(os.path.join(tree, name), 0o755)
        names = subprocess.run(["find", "."], cwd=tree, check=True, capture_output=True).stdout
        archive = subprocess.run([BUSYBOX, "cpio", "-o", "-H", "newc"], cwd=tree, input=names,
                                 check=True, capture_output=True).stdout
        with open(dest, "wb") as f:
            f.write(archive)  # uncompressed: the kernel takes a plain cpio as its initramfs
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def run(kernel: Kernel, argv: list[str], *, cwd: str, env: dict[str, str],
        timeout: float = 600) -> Result:
    """Boot the guest, run `argv` in `cwd` on the host's filesystem, power off."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    script = (f"cd {shlex.quote(cwd)} || exit 125\n"
              f"exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "
              f"HOME=/root LANG=C.UTF-8 TMPDIR=/run/tmp PYTHONDONTWRITEBYTECODE=1 {exports} "
              f"{shlex.join(argv)} 2>&1\n")
    work = tempfile.mkdtemp(prefix="pyproxy-vm-")
    try:
        initrd = os.path.join(work, "initrd.cpio")
        build_initramfs(kernel, script, initrd)
        cmd = [
            # Software emulation: nested KVM on these hosts hangs the guest kernel at boot.
            QEMU, "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2", "-nodefaults", "-no-reboot",
            "-display", "none", "-serial", "stdio", "-nic", "none",
            "-kernel", kernel.image, "-initrd", initrd,
            "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                       "multidevs=remap",
        ]
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout)
            console = (done.stdout + done.stderr).decode(errors="replace")
        except subprocess.TimeoutExpired as exc:
            console = ((exc.stdout or b"") + (exc.stderr or b"")).decode(errors="replace")
            return Result(None, console + f"\n[timed out after {timeout} s]")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    code = None
    for line in console.splitlines():
        if line.startswith(EXIT_MARK + " "):
            code = int(line.split()[1])
    return Result(code, console)
