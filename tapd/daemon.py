"""``tapd``: the daemon's command line and its life from start to stop."""

from __future__ import annotations

import argparse
import gc
import resource
import signal
import sys
from typing import TYPE_CHECKING

from . import __version__
from .wire import DEFAULT_SOCKET

# The rest is imported where it is used: `tapd --version`, `--help` and
# `--check-config` need neither trio nor the kernel modules (pyroute2 alone
# is ~0.1 s), and a daemon that serves imports them all once anyway.
if TYPE_CHECKING:
    from .config import Config
    from .listen import Listener
    from .sdnotify import Notifier
    from .service import Service


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
    from .listen import at_path, from_fd, from_systemd

    if listen_fd is not None:
        return from_fd(listen_fd)
    activated = from_systemd()
    if activated is not None:
        return activated
    server = config.server
    return at_path(socket_path or server.socket, server.mode, server.socket_group)


#: how long a clean stop waits for requests in flight
DRAIN_SECONDS = 10.0


async def run(config: Config, listener: Listener, config_path: str | None = None) -> None:
    import trio

    from . import log as logging
    from .errors import TapdError
    from .lifecycle import Lifecycle
    from .sdnotify import Notifier
    from .server import Server
    from .service import Service
    from .taps import KernelTaps
    from .worker import KernelWorker

    log = logging.get()
    notifier = Notifier()
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
        service = Service(config, maker, worker, lifecycle, config_path)
        server = Server(service)
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*signals) as received:
            async with trio.open_nursery() as nursery:
                await nursery.start(lifecycle.run)
                accepting = trio.CancelScope()

                async def accept() -> None:
                    with accepting:
                        await server.serve(listener.sock, nursery)

                nursery.start_soon(accept)
                if notifier.watchdog_interval:
                    nursery.start_soon(_watchdog, notifier, notifier.watchdog_interval)
                log.info(
                    "server.listening",
                    source=listener.source,
                    path=listener.path,
                    version=__version__,
                    leases=len(lifecycle.registry),
                )
                gc.freeze()
                gc.enable()
                notifier.notify("READY=1", f"STATUS=serving, {len(lifecycle.registry)} leases")
                async for signum in received:
                    if signum == signal.SIGHUP:
                        _reload(service, config_path, notifier)
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
    import trio

    while True:
        notifier.notify("WATCHDOG=1")
        await trio.sleep(interval)


def _reload(service: Service, path: str | None, notifier: Notifier) -> None:
    """SIGHUP: read the configuration again; keep the old one if the new is bad."""
    from . import log as logging
    from .config import ConfigError, load

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


def main(argv: list[str] | None = None) -> int:
    # No cyclic GC while tapd starts: its imports (trio, pydantic's schemas,
    # pyroute2) make hundreds of thousands of objects, and collecting them
    # over and over cost ~20% of the start-up, which is the first VM's wait
    # under socket activation.  run() freezes what start-up made and turns
    # the collector back on before the first request (gc.freeze(): later
    # collections never scan those objects again).
    gc.disable()
    try:
        return _main(argv)
    finally:
        gc.enable()


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from . import log as logging
    from .config import ConfigError, load
    from .listen import ListenError

    _raise_fd_limit()
    # The kernel worker thread wakes from each syscall needing the GIL back;
    # with the default 5 ms switch interval a busy loop thread could make it
    # wait that long.  1 ms bounds that wait without much switching overhead.
    sys.setswitchinterval(0.001)
    logging.configure()
    log = logging.get()
    if args.check_config is not None:
        try:
            load(args.check_config)
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"{exc.path}: {problem}", file=sys.stderr)
            return 1
        print(f"{args.check_config}: ok")
        return 0
    try:
        config = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config.invalid", path=exc.path, problem=problem)
        return 2
    try:
        listener = open_listener(config, args.socket, args.listen_fd)
    except ListenError as exc:
        log.error("server.listen.failed", message=str(exc))
        return 2
    import trio

    trio.run(run, config, listener, args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
