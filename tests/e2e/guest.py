"""A tiny real Linux guest for end-to-end tests, booted with QEMU (TCG).

The guest is Debian's cloud kernel plus a busybox initramfs whose ``/init``
brings up the first virtio NIC, pings an address given on the kernel command
line, reports what it saw on the serial console as ``TAPD-GUEST k=v`` lines and
powers off, which makes QEMU exit.

Host prerequisites (QEMU, busybox-static, cpio, the unpacked guest kernel) are
installed by ``.ci/install-e2e-deps``.

Kernel command line understood by the guest ``/init``:

``tapd.ip=ADDR/PREFIX``
    address for the first NIC (required for networking).
``tapd.ping=ADDR``
    address to ping; omitted means no ping (``ping=skip``).
``tapd.pingtries=N``
    how many one-second attempts to wait for the first reply (default 15):
    the host side (bridge, tapd) may need a moment before frames flow.
``tapd.pingcount=N``
    once a first reply arrived, send N more echo requests and require all of
    them to be answered (default 0: the first reply is enough).
``tapd.wait=SECONDS``
    sleep this long after the ping before powering off (for tests that kill
    QEMU mid-run).
``tapd.listen=1``
    after the ping (and wait), never power off: the guest kernel keeps
    answering pings until QEMU is killed.
``tapd.fetch=URL``
    after the ping, download URL with busybox wget, timed by the guest's
    uptime (``fetch=ok ft0=T ft1=T``): what the guest receives.
``tapd.post=URL,KIB``
    then POST KIB KiB (of "x") to URL, timed the same way (``post=ok pt0=T
    pt1=T``): what the guest sends.

Serial output lines (parse with :func:`parse_guest_output`)::

    TAPD-GUEST boot
    TAPD-GUEST modules=virtio_net,...        (modules insmod'ed, in order)
    TAPD-GUEST nic=eth0 mac=52:54:00:12:34:56 rxqueues=1 txqueues=1
    TAPD-GUEST ping=ok tries=2 uptime=5.31   (or ping=fail / ping=skip)
    TAPD-GUEST pingcount=3 received=3         (only with tapd.pingcount)
    TAPD-GUEST listen=1                        (only with tapd.listen=1)
    TAPD-GUEST done
    TAPD-GUEST error=no-nic                    (on failure, before done)
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_CACHE_DIR",
    "GUEST_MODULES",
    "GuestError",
    "GuestImage",
    "GuestRun",
    "build_guest",
    "parse_guest_output",
    "qemu_argv",
    "run_qemu",
]

DEFAULT_CACHE_DIR = Path("/var/cache/tapd-tests/guest")
INSTALL_HINT = "run .ci/install-e2e-deps (as root) to install QEMU and the guest kernel"

# Load order matters: insmod does no dependency resolution, so every module
# must come after the ones it uses.  Names missing from the kernel package
# are skipped (they are either built in or do not exist in that version).
GUEST_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)

BUSYBOX_CANDIDATES: tuple[Path, ...] = (Path("/bin/busybox"), Path("/usr/bin/busybox"))

MARKER = "TAPD-GUEST"

_PT_INTERP = 3  # ELF program header type of the dynamic loader path

# The guest's /init.  Kept free of bashisms: it runs under busybox ash.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
# The kernel may have found no /dev/console in the initramfs before devtmpfs
# was mounted, so make sure our output really reaches the serial console.
exec </dev/console >/dev/console 2>&1

say() { echo "TAPD-GUEST $*"; }
finish() { say done; sync; poweroff -f; sleep 5; exit 1; }

say boot

IP=; PING=; PINGTRIES=15; PINGCOUNT=0; WAIT=0; LISTEN=0; FETCH=; POST=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        tapd.ip=*) IP="${arg#tapd.ip=}" ;;
        tapd.ping=*) PING="${arg#tapd.ping=}" ;;
        tapd.pingtries=*) PINGTRIES="${arg#tapd.pingtries=}" ;;
        tapd.pingcount=*) PINGCOUNT="${arg#tapd.pingcount=}" ;;
        tapd.wait=*) WAIT="${arg#tapd.wait=}" ;;
        tapd.listen=*) LISTEN="${arg#tapd.listen=}" ;;
        tapd.fetch=*) FETCH="${arg#tapd.fetch=}" ;;
        tapd.post=*) POST="${arg#tapd.post=}" ;;
    esac
done

loaded=
for mod in $(cat /etc/tapd-modules); do
    if insmod "/lib/modules/$mod.ko"; then
        loaded="$loaded${loaded:+,}$mod"
    else
        say "error=insmod-$mod"
    fi
done
say "modules=${loaded:-none}"

# Probing is asynchronous with respect to insmod returning on some kernels:
# give the NIC up to ~5 s to appear.
NIC=
i=0
while [ $i -lt 50 ]; do
    for path in /sys/class/net/*; do
        name="${path##*/}"
        [ "$name" = lo ] || [ ! -e "$path/device" ] && continue
        NIC="$name"
        break
    done
    [ -n "$NIC" ] && break
    sleep 0.1
    i=$((i + 1))
done
if [ -z "$NIC" ]; then
    say error=no-nic
    finish
fi

ip link set lo up
[ -n "$IP" ] && ip addr add "$IP" dev "$NIC"
ip link set "$NIC" up
rxq=$(ls -d /sys/class/net/"$NIC"/queues/rx-* 2>/dev/null | wc -l)
txq=$(ls -d /sys/class/net/"$NIC"/queues/tx-* 2>/dev/null | wc -l)
say "nic=$NIC mac=$(cat /sys/class/net/$NIC/address) rxqueues=$rxq txqueues=$txq"

if [ -z "$PING" ]; then
    say ping=skip
else
    ok=0
    tries=0
    while [ $tries -lt "$PINGTRIES" ]; do
        tries=$((tries + 1))
        if ping -c 1 -W 1 "$PING" >/dev/null 2>&1; then
            ok=1
            break
        fi
    done
    if [ $ok = 1 ] && [ "$PINGCOUNT" -gt 0 ]; then
        received=$(ping -c "$PINGCOUNT" -W 2 "$PING" 2>/dev/null \
            | sed -n 's/.* \([0-9][0-9]*\) packets received.*/\1/p')
        say "pingcount=$PINGCOUNT received=${received:-0}"
        [ "${received:-0}" = "$PINGCOUNT" ] || ok=0
    fi
    up=$(cut -d' ' -f1 /proc/uptime)
    if [ $ok = 1 ]; then
        say "ping=ok tries=$tries uptime=$up"
    else
        say "ping=fail tries=$tries uptime=$up"
    fi
fi

# Timed transfers, for rate limits: the clock is the guest's own uptime.
if [ -n "$FETCH" ]; then
    t0=$(cut -d' ' -f1 /proc/uptime)
    if wget -q -O /dev/null "$FETCH"; then r=ok; else r=fail; fi
    t1=$(cut -d' ' -f1 /proc/uptime)
    say "fetch=$r ft0=$t0 ft1=$t1"
fi
if [ -n "$POST" ]; then
    # not zeros: busybox wget sends a --post-file as a C string (strlen)
    dd if=/dev/zero bs=1024 count="${POST##*,}" 2>/dev/null | tr '\0' x >/blob
    t0=$(cut -d' ' -f1 /proc/uptime)
    if wget -q -O /dev/null --post-file=/blob "${POST%,*}"; then r=ok; else r=fail; fi
    t1=$(cut -d' ' -f1 /proc/uptime)
    rm -f /blob
    say "post=$r pt0=$t0 pt1=$t1"
fi

[ "$WAIT" != 0 ] && sleep "$WAIT"

if [ "$LISTEN" = 1 ]; then
    # The kernel answers ICMP echo by itself; just never power off.
    say listen=1
    while :; do sleep 3600; done
fi

finish
"""


class GuestError(RuntimeError):
    """The guest image cannot be built (usually: missing host prerequisites)."""


@dataclass(frozen=True)
class GuestImage:
    """A bootable guest: kernel image plus an initramfs built for it."""

    kernel: Path
    initrd: Path
    # Modules packed into the initrd, in insmod order (informational).
    modules: tuple[str, ...] = ()
    # Wanted modules that the kernel has built in (informational).
    builtin: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestRun:
    """Result of :func:`run_qemu`."""

    returncode: int | None  # None: QEMU was killed after the timeout
    output: str
    elapsed: float

    @property
    def report(self) -> dict[str, str]:
        return parse_guest_output(self.output)


def _default_cache_dir() -> Path:
    env = os.environ.get("TAPD_GUEST_CACHE")
    return Path(env) if env else DEFAULT_CACHE_DIR


def _kernel_root(cache_dir: Path) -> Path:
    """The dpkg -x tree of the guest kernel package inside ``cache_dir``."""
    current = cache_dir / "current"
    if (current / ".unpacked").is_file():
        return current.resolve()
    # No "current" link (e.g. a cache filled by hand): take the newest
    # completely unpacked kernel package.
    candidates = sorted(
        (p.parent for p in cache_dir.glob("linux-image-*/.unpacked")),
        key=lambda p: p.stat().st_mtime,
    )
    if not candidates:
        raise GuestError(f"no unpacked guest kernel under {cache_dir}; {INSTALL_HINT}")
    return candidates[-1]


def _find_kernel(root: Path) -> tuple[Path, Path]:
    """Return (vmlinuz, modules dir) of the unpacked kernel package."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestError(
            f"expected one boot/vmlinuz-* in {root}, found {len(kernels)}; " + INSTALL_HINT
        )
    kernel = kernels[0]
    release = kernel.name.removeprefix("vmlinuz-")
    # Debian 12 ships modules in /lib/modules; merged-/usr packages in /usr/lib.
    for moddir in (root / "lib/modules" / release, root / "usr/lib/modules" / release):
        if moddir.is_dir():
            return kernel, moddir
    raise GuestError(f"no modules directory for kernel {release} in {root}; {INSTALL_HINT}")


def _module_files(moddir: Path) -> dict[str, Path]:
    """Map module name (underscored) to its possibly compressed .ko file."""
    found: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        name = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", path.name)
        if name != path.name:
            # The kernel treats '-' and '_' in module names as equivalent.
            found[name.replace("-", "_")] = path
    return found


def _builtin_modules(moddir: Path) -> set[str]:
    builtin_list = moddir / "modules.builtin"
    if not builtin_list.is_file():
        return set()
    names = set()
    for line in builtin_list.read_text().splitlines():
        stem = line.strip().rsplit("/", 1)[-1].removesuffix(".ko")
        if stem:
            names.add(stem.replace("-", "_"))
    return names


def _read_module(path: Path) -> bytes:
    """Return the uncompressed module; busybox insmod cannot decompress."""
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        # Python 3.11 has no zstd module; the zstd CLI comes with the deps.
        if shutil.which("zstd") is None:
            raise GuestError(f"{path.name} is zstd-compressed but zstd is missing; {INSTALL_HINT}")
        return subprocess.run(
            ["zstd", "-dc", "--", str(path)], check=True, stdout=subprocess.PIPE
        ).stdout
    return path.read_bytes()


def _is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF64 executable without a PT_INTERP segment.

    A dynamically linked busybox would make the guest panic with an obscure
    "No working init found", so check up front.
    """
    with path.open("rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        endian = "<" if header[5] == 1 else ">"
        phoff = struct.unpack_from(endian + "Q", header, 0x20)[0]
        phentsize, phnum = struct.unpack_from(endian + "HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(
        struct.unpack_from(endian + "I", table, i * phentsize)[0] != _PT_INTERP
        for i in range(phnum)
    )


def _find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        if candidate.is_file() and _is_static_elf(candidate):
            return candidate
    raise GuestError(f"no statically linked busybox found (busybox-static); {INSTALL_HINT}")


def _write_cpio(staging: Path, dest: Path) -> None:
    """Pack ``staging`` as a gzip-compressed newc cpio archive at ``dest``."""
    if shutil.which("cpio") is None:
        raise GuestError(f"the cpio tool is missing; {INSTALL_HINT}")
    paths = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
    archive = subprocess.run(
        [
            "cpio",
            "--create",
            "--null",
            "--format=newc",
            "--owner=0:0",
            "--reproducible",
            "--quiet",
        ],
        cwd=staging,
        input=b"".join(p.encode() + b"\0" for p in paths),
        stdout=subprocess.PIPE,
        check=True,
    ).stdout
    # Write next to the destination and rename, so concurrent builders (e.g.
    # parallel test workers) never see a half-written initrd.
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".initrd-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(gzip.compress(archive, compresslevel=6, mtime=0))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_guest(cache_dir: Path | None = None) -> GuestImage:
    """Locate the cached guest kernel and build (or reuse) its initramfs.

    The initrd is cached in ``cache_dir/initramfs/`` keyed by a hash of the
    init script, the module list and the exact inputs (kernel release, module
    contents, busybox), so repeated calls cost only that hash.
    """
    cache_dir = cache_dir if cache_dir is not None else _default_cache_dir()
    if not cache_dir.is_dir():
        raise GuestError(f"guest cache {cache_dir} does not exist; {INSTALL_HINT}")
    kernel, moddir = _find_kernel(_kernel_root(cache_dir))
    files = _module_files(moddir)
    builtin = _builtin_modules(moddir)
    wanted = [m for m in GUEST_MODULES if m in files]
    if "virtio_net" not in files and "virtio_net" not in builtin:
        raise GuestError(f"kernel {kernel.name} has neither a virtio_net module nor a built-in one")
    busybox = _find_busybox()

    key = hashlib.sha256()
    key.update(INIT_SCRIPT.encode())
    key.update(kernel.name.encode())
    for name in wanted:
        stat = files[name].stat()
        key.update(f"\0{name}\0{files[name].name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    key.update(hashlib.sha256(busybox.read_bytes()).digest())
    initrd_dir = cache_dir / "initramfs"
    initrd_dir.mkdir(exist_ok=True)
    initrd = initrd_dir / f"initrd-{key.hexdigest()[:16]}.cpio.gz"

    if not initrd.is_file():
        with tempfile.TemporaryDirectory(prefix="tapd-initramfs-") as tmp:
            staging = Path(tmp)
            for sub in ("bin", "dev", "etc", "proc", "sys", "lib/modules"):
                (staging / sub).mkdir(parents=True)
            shutil.copy2(busybox, staging / "bin/busybox")
            (staging / "bin/busybox").chmod(0o755)
            init = staging / "init"
            init.write_text(INIT_SCRIPT)
            init.chmod(0o755)
            for name in wanted:
                (staging / "lib/modules" / f"{name}.ko").write_bytes(_read_module(files[name]))
            (staging / "etc/tapd-modules").write_text("".join(f"{m}\n" for m in wanted))
            _write_cpio(staging, initrd)

    return GuestImage(
        kernel=kernel,
        initrd=initrd,
        modules=tuple(wanted),
        builtin=tuple(m for m in GUEST_MODULES if m not in files and m in builtin),
    )


def qemu_argv(
    image: GuestImage,
    netdev: str,
    *,
    ip: str,
    ping: str,
    device: str = "virtio-net-pci,netdev=n0",
    smp: int = 1,
    mem: str = "256M",
    extra_cmdline: str = "",
    qemu: str = "qemu-system-x86_64",
) -> list[str]:
    """argv booting ``image`` with one NIC: ``-netdev NETDEV -device DEVICE``.

    ``netdev`` is the complete ``-netdev`` value, e.g. ``tap,id=n0,fd=3``
    (the fd must then be passed to QEMU, see :func:`run_qemu`).  ``ping`` may
    be empty to skip the ping.  ``extra_cmdline`` is appended to the kernel
    command line, e.g. ``"tapd.wait=30"`` or ``"tapd.listen=1"``.

    The serial console goes to QEMU's stdout; run it with stdin not a
    terminal (e.g. ``/dev/null``) so QEMU leaves the caller's tty alone.
    """
    cmdline = ["console=ttyS0", "quiet", "panic=-1", f"tapd.ip={ip}"]
    if ping:
        cmdline.append(f"tapd.ping={ping}")
    if extra_cmdline:
        cmdline.append(extra_cmdline)
    return [
        qemu,
        "-accel", "tcg",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial", "stdio",
        # poweroff -f exits QEMU via ACPI; a crashing /init panics and, with
        # panic=-1, reboots at once, which -no-reboot turns into an exit too.
        "-no-reboot",
        "-m", mem,
        "-smp", str(smp),
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join(cmdline),
        "-netdev", netdev,
        "-device", device,
    ]  # fmt: skip


_LINE_RE = re.compile(re.escape(MARKER) + r" (.*)")


def parse_guest_output(text: str) -> dict[str, str]:
    """Collect the ``TAPD-GUEST k=v ...`` lines of the serial output.

    Each ``k=v`` token becomes an entry (later lines win); a bare word such as
    ``done`` maps to ``""``, so ``"done" in result`` tells whether the guest
    finished.  Other console output (kernel messages, CRs) is ignored.
    """
    result: dict[str, str] = {}
    for line in text.splitlines():
        match = _LINE_RE.search(line.replace("\r", ""))
        if match is None:
            continue
        for token in match.group(1).split():
            key, _, value = token.partition("=")
            result[key] = value
    return result


def run_qemu(
    argv: Sequence[str],
    *,
    timeout: float = 120.0,
    pass_fds: Sequence[int] = (),
) -> GuestRun:
    """Run QEMU to completion (guest power-off) and capture the serial output.

    On timeout QEMU is killed and ``returncode`` is ``None``; the output up to
    then is still returned, so assertions can show what the guest printed.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        pass_fds=tuple(pass_fds),
    )
    returncode: int | None
    try:
        out, _ = proc.communicate(timeout=timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        returncode = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return GuestRun(returncode, out.decode(errors="replace"), time.monotonic() - start)
