"""``tapd``: the daemon's command line and its life from start to stop."""

from __future__ import annotations

import argparse
import gc
import resource
import signal
import socket
import sys
import traceback
from collections.abc import Sized

import trio

from . import __version__
from . import log as logging
from .closer import CloserError, Closers
from .config import DEFAULT_SOCKET, Config, ConfigError, load
from .errors import ConfigInvalid, TapdError, to_wire
from .lifecycle import Lifecycle
from .listen import Listener, ListenError, at_path, from_fd, from_systemd
from .making import KernelMaker
from .protocol import encode
from .sdnotify import Notifier
from .server import Server
from .service import Service
from .taps import KernelTaps
from .worker import KernelWorker


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tapd",
        description="Hand bridged tap devices to unprivileged VMMs over a UNIX socket.",
    )
    p.add_argument("--config", metavar="PATH", help="TOML configuration (default: built-in)")
    p.add_argument(
        "--socket",
        metavar="PATH",
        help=f"listen on this path (default: the config's, else {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--listen-fd",
        metavar="N",
        type=int,
        help="serve an inherited, already listening UNIX socket on fd N",
    )
    p.add_argument(
        "--check-config",
        metavar="PATH",
        help="validate a configuration file, print each problem, and exit",
    )
    p.add_argument("--version", action="version", version=f"tapd {__version__}")
    return p


def open_listener(config: Config, socket_path: str | None, listen_fd: int | None) -> Listener:
    if listen_fd is not None:
        return from_fd(listen_fd)
    activated = from_systemd()
    if activated is not None:
        return activated
    server = config.server
    return at_path(socket_path or server.socket, server.mode, server.socket_group)


#: how long a clean stop waits for requests in flight
DRAIN_SECONDS = 10.0


async def run(
    config: Config,
    listener: Listener,
    config_path: str | None = None,
    notifier: Notifier | None = None,
    closers: Closers | None = None,
) -> None:
    log = logging.get()
    notifier = notifier if notifier is not None else Notifier()
    closers = closers or Closers.start()
    closers.configure(config.server)
    worker = KernelWorker()
    maker = KernelTaps(config.taps.tun_device)
    try:
        # Both threads that make taps get their netlink socket now.
        maker.netlink.thread_socket()
        await worker.run(maker.netlink.thread_socket)
        try:
            features = await worker.run(lambda: maker.features)
            log.info("tun.features", vnet_hdr=features.vnet_hdr, multi_queue=features.multi_queue)
        except TapdError as exc:
            # Keep serving: every request will get this error, with its advice.
            log.error("tun.unavailable", message=exc.message)
        lifecycle = Lifecycle(config, worker, maker.netlink)
        service = Service(config, KernelMaker(maker, worker), lifecycle, config_path)
        server = Server(service, closers)
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*signals) as received:
            async with trio.open_nursery() as nursery:
                await nursery.start(lifecycle.run)
                await nursery.start(closers.run)
                accepting = trio.CancelScope()

                async def accept() -> None:
                    with accepting:
                        await server.serve(listener.sock, nursery)

                nursery.start_soon(accept)
                if notifier.watchdog_interval:
                    nursery.start_soon(_watchdog, notifier, notifier.watchdog_interval)
                if notifier.enabled:
                    nursery.start_soon(_lease_status, notifier, lifecycle.registry)
                log.info(
                    "server.listening",
                    source=listener.source,
                    path=listener.path,
                    version=__version__,
                    leases=len(lifecycle.registry),
                )
                # What start-up made stays: never scanned by a collection again.
                gc.freeze()
                gc.enable()
                notifier.notify("READY=1", _serving(len(lifecycle.registry)))
                async for signum in received:
                    if signum == signal.SIGHUP:
                        _reload(service, config_path, notifier)
                        notifier.notify(_serving(len(lifecycle.registry)))
                        closers.configure(service.config.server)
                        continue
                    log.info("server.stopping", signal=signal.Signals(signum).name)
                    notifier.notify("STOPPING=1", "STATUS=stopping")
                    # Stop accepting, let requests in flight finish (bounded),
                    # then go.  Taps that VMs hold stay: they are not tapd's.
                    accepting.cancel()
                    with trio.move_on_after(DRAIN_SECONDS):
                        await server.idle.wait()
                    nursery.cancel_scope.cancel()
                    break
    finally:
        await worker.run(maker.close)
        worker.close()
        listener.cleanup()
        log.info("server.stopped")


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.notify("WATCHDOG=1")
        await trio.sleep(interval)


def _serving(leases: int) -> str:
    return f"STATUS=serving, {leases} lease{'' if leases == 1 else 's'}"


#: how often STATUS= catches up with the lease count
STATUS_SECONDS = 1.0


async def _lease_status(notifier: Notifier, registry: Sized) -> None:
    """Keep ``systemctl status``'s line in step with the live leases.

    Leases begin and end in several places (grants, releases, the kernel's
    RTM_DELLINK, owners exiting, a restart's resync); reading the count once
    a second costs nothing and needs no hook in each of them.
    """
    said = len(registry)
    while True:
        await trio.sleep(STATUS_SECONDS)
        if len(registry) != said:
            said = len(registry)
            notifier.notify(_serving(said))


def _reload(service: Service, path: str | None, notifier: Notifier) -> None:
    """SIGHUP: read the configuration again; keep the old one if the new is bad."""
    log = logging.get()
    if path is None:
        log.info("config.reload.skipped", reason="no --config file; built-in defaults stay")
        return
    notifier.notify("RELOADING=1")
    try:
        config = load(path)
    except ConfigError as exc:
        log.error("config.reload.failed", path=path, problems=exc.problems, kept="previous")
    else:
        service.reconfigure(config)
        log.info("config.reload.complete", path=path)
    notifier.notify("READY=1")


def _raise_fd_limit() -> None:
    """Every live lease holds a pidfd for its owner, and each connection a
    socket and a pidfd: 1000 VMs need more than the usual soft limit of
    1024 open files.  Take the hard limit (systemd's default: 524288)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


#: exit statuses (tapd(8)): a file --check-config refused; a configuration or
#: socket tapd cannot start with; a bug (sysexits.h's EX_SOFTWARE)
EXIT_CHECK_FAILED = 1
EXIT_CANNOT_START = 2
EXIT_BUG = 70


def main(argv: list[str] | None = None) -> int:
    """``tapd``: whatever goes wrong, one line on stderr and an exit status,
    never a traceback (the details a bug report needs are in that line)."""
    # No cyclic GC while tapd starts: its imports (trio, pydantic's schemas,
    # pyroute2) make hundreds of thousands of objects, and collecting them
    # over and over cost ~20% of the start-up, which is the first VM's wait
    # under socket activation.  run() freezes what start-up made and turns
    # the collector back on before the first request (gc.freeze(): later
    # collections never scan those objects again).
    gc.disable()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Exception as exc:
        _crashed(exc)
        return EXIT_BUG
    finally:
        gc.enable()


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    logging.configure()
    if args.check_config is not None:
        return _check(args.check_config)
    _raise_fd_limit()
    # The kernel worker thread wakes from each syscall needing the GIL back;
    # with the default 5 ms switch interval a busy loop thread could make it
    # wait that long.  1 ms bounds that wait without much switching overhead.
    sys.setswitchinterval(0.001)
    log = logging.get()
    try:
        config = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config.invalid", path=exc.path, problem=problem)
        return _unconfigured_start(exc, args.listen_fd)
    try:
        listener = open_listener(config, args.socket, args.listen_fd)
    except ListenError as exc:
        log.error("server.listen.failed", message=str(exc))
        return EXIT_CANNOT_START
    closers = _closers()
    if closers is None:
        return EXIT_CANNOT_START
    trio.run(run, config, listener, args.config, None, closers)
    return 0


def _unconfigured_start(error: ConfigError, listen_fd: int | None) -> int:
    """A configuration tapd cannot use, at start.

    Under socket activation, exiting would not stop the clients: each queued
    connection starts tapd again, and five failures in a row take tapd.socket
    down until ``systemctl reset-failed``.  So tapd stays, answers every
    request with ``config-invalid`` and waits for a reload.  Anywhere else the
    one who started tapd has seen the errors, and it exits.
    """
    try:
        activated = from_systemd() if listen_fd is None else None
    except ListenError as exc:
        logging.get().error("server.listen.failed", message=str(exc))
        return EXIT_CANNOT_START
    if activated is None:
        return EXIT_CANNOT_START
    closers = _closers()
    if closers is None:
        return EXIT_CANNOT_START
    notifier = Notifier()
    config = trio.run(_unconfigured, activated, error, notifier)
    if config is not None:
        trio.run(run, config, activated, error.path, notifier, closers)
    return 0


def _closers() -> Closers | None:
    """tapd's closers, made while it has a single thread (see tapd.closer)."""
    try:
        return Closers.start()
    except (CloserError, OSError) as exc:
        logging.get().error("closer.start.failed", error=str(exc))
        return None


def _check(path: str) -> int:
    """--check-config: each problem on a line of its own, in words an admin
    can act on (the journal ranks them as errors when reload runs this)."""
    try:
        load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{logging.prefix('error')}{exc.path}: {problem}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"{path}: ok")
    return 0


def _fix(exc: ConfigError) -> str:
    more = len(exc.problems) - 1
    first = exc.problems[0] if exc.problems else "invalid"
    return (
        f"not serving: {exc.path}: {first}" + (f" (and {more} more)" if more else "")
        + "; fix it, then: systemctl reload tapd"
    )  # fmt: skip


async def _unconfigured(
    listener: Listener, error: ConfigError, notifier: Notifier
) -> Config | None:
    """Serve nothing but the news that the configuration is invalid, until a
    SIGHUP brings a valid one (returned) or SIGTERM/SIGINT ends it (None)."""
    log = logging.get()
    path = error.path
    reply = encode(
        to_wire(
            ConfigInvalid(
                f"tapd is not serving: its configuration file {path} is invalid; the "
                f"administrator must fix it (tapd --check-config {path}) and reload tapd"
            )
        )
    )
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    with trio.open_signal_receiver(*signals) as received:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_refuse_all, listener.sock, reply)
            if notifier.watchdog_interval:
                nursery.start_soon(_watchdog, notifier, notifier.watchdog_interval)
            notifier.notify("READY=1", "STATUS=" + _fix(error))
            async for signum in received:
                if signum != signal.SIGHUP:
                    notifier.notify("STOPPING=1", "STATUS=stopping")
                    nursery.cancel_scope.cancel()
                    return None
                try:
                    config = load(path)
                except ConfigError as exc:
                    log.error("config.reload.failed", path=path, problems=exc.problems)
                    notifier.notify("STATUS=" + _fix(exc))
                    continue
                log.info("config.reload.complete", path=path)
                nursery.cancel_scope.cancel()
                return config
    return None


#: connections answered at once while unconfigured; more wait in the backlog
_REFUSING = 64


async def _refuse_all(listener: socket.socket, reply: bytes) -> None:
    """Read each connection's first line (so that the client, still sending,
    sees no EPIPE and the reply is not lost to an ECONNRESET) and answer it."""
    listener.setblocking(False)
    limit = trio.CapacityLimiter(_REFUSING)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError:
                await trio.sleep(0.1)  # EMFILE and the like: let others finish
                continue
            await limit.acquire_on_behalf_of(sock)
            nursery.start_soon(_refuse_one, sock, reply, limit)


async def _refuse_one(sock: socket.socket, reply: bytes, limit: trio.CapacityLimiter) -> None:
    try:
        with sock, trio.move_on_after(5):
            sock.setblocking(False)
            seen = b""
            while b"\n" not in seen and len(seen) < 65536:
                await trio.lowlevel.wait_readable(sock)
                # A plain recv takes no SCM_RIGHTS: fds sent along are closed
                # by the kernel (unix_detach_fds), never installed here.
                chunk = sock.recv(65536)
                if not chunk:
                    break
                seen += chunk
            sock.send(reply)
    except OSError:
        pass
    finally:
        limit.release_on_behalf_of(sock)


def _crashed(exc: BaseException) -> None:
    """One line for an error tapd did not expect: what, and where it was raised."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    try:
        logging.get().critical("tapd.crashed", error=f"{type(exc).__name__}: {exc}", at=where)
    except Exception:
        print(f"tapd: {type(exc).__name__}: {exc} (at {where})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
