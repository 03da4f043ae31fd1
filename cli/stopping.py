"""How `fescale serve` stops: SIGTERM or SIGINT, at any moment of its life, shuts Serve down and exits 0.

Why not one `signal.signal` call. `ray.init` in the main thread replaces the Python SIGTERM handler
with its own (`sys.exit(15)`), and the driver's core worker hooks SIGTERM below Python (absl's
failure handler: it prints `*** SIGTERM received at time=... ***` and a stack, then passes the
signal on). A handler installed before `ray.init` is gone after it; one installed once `serve.run`
returns misses the second or more in which the app already answers HTTP while `serve.run` still
polls the app's status (every 1 s, longer on a loaded machine): a SIGTERM then went to Ray's
handler and the server exited 15 without shutting Serve down (issue 17).

So start-up (`ray.init`, then the pools and the app) runs in a helper thread: Ray leaves the Python
handlers of a non-main thread's `ray.init` alone, and the main thread keeps fescale's handlers,
taking SIGTERM back from the core worker's hook as soon as Ray is connected. The handlers only set
a flag (raising inside a Ray call that polls for signals can abort the process); the main thread
waits for start-up or that flag, then shuts down what has started.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Callable, NoReturn

import ray

log = logging.getLogger("fescale")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Ray warns that a non-main thread's ray.init leaves SIGTERM alone: here that is the point, not news.
logging.getLogger("ray._private.worker").addFilter(lambda r: not r.getMessage().startswith("SIGTERM handler is not set"))


class Startup(threading.Thread):
    """`connect()` then, unless a stop came first, `start()`, off the main thread; wakes `wake` at each step."""

    def __init__(self, connect: Callable[[], None], start: Callable[[], str], stopping: threading.Event, wake: threading.Event):
        super().__init__(name="fescale-serve-startup", daemon=True)
        self.connect, self.start_app, self.stopping, self.wake = connect, start, stopping, wake
        self.lock = threading.Lock()  # orders "start the app" against "a stop came": one of them sees the other
        # Ray starts a local cluster's processes with PR_SET_PDEATHSIG, which Linux fires when the
        # *thread* that started them ends: this thread must outlive the cluster, so it ends only
        # once the main thread has shut Ray down and sets `release`.
        self.release = threading.Event()
        self.connected = self.app_started = self.done = False
        self.url: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.connect()
            self.connected = True
            self.wake.set()
            with self.lock:
                if self.stopping.is_set():
                    return
                self.app_started = True
            self.url = self.start_app()
        except BaseException as e:  # handed to the main thread, which raises it unless it is stopping anyway
            self.error = e
        finally:
            self.done = True
            self.wake.set()
            self.release.wait()


def serve_until_stopped(connect: Callable[[], None], start: Callable[[], str], on_ready: Callable[[str], None], shutdown: Callable[[], None]) -> str:
    """Start (`connect`, then `start` returning the URL), call `on_ready(url)`, serve until SIGTERM or
    SIGINT, then `shutdown()` if the app was started; the signal's name. A failed start-up raises its
    error (after a shutdown). Call from the main thread."""
    stopping, wake = threading.Event(), threading.Event()
    received: list[int] = []

    def handle(signum, frame) -> None:
        received.append(signum)
        stopping.set()
        wake.set()

    def install() -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, handle)

    install()
    log.info("starting Ray, the role pools and the Serve app; SIGTERM or Ctrl-C stops at any time")
    startup = Startup(connect, start, stopping, wake)
    startup.start()
    reclaimed = announced = False
    while True:
        wake.clear()  # before the checks: a wake-up during them makes the wait below return at once
        if startup.connected and not reclaimed:
            install()  # the core worker hooked SIGTERM below Python when Ray connected: take it back
            reclaimed = True
        if startup.done and startup.error is None and not announced and not stopping.is_set():
            on_ready(startup.url)
            announced = True
        if stopping.is_set() or (startup.done and startup.error is not None):
            break
        wake.wait()
    while not (startup.connected or startup.done):  # a stop during ray.init: let it finish, then stop what it started
        wake.clear()
        wake.wait(1)
    install()  # also when Ray connected just as the stop came: a second signal stays fescale's
    with startup.lock:
        app_started = startup.app_started
    try:
        if app_started and ray.is_initialized():
            shutdown()
    finally:
        if startup.connected:
            ray.shutdown()  # while the start-up thread lives: its end kills a local cluster's processes
        startup.release.set()
        startup.join(timeout=30)  # serve.run, if it was still waiting, ends once the app is gone
    if not received and startup.error is not None:
        raise startup.error
    return signal.Signals(received[0]).name


def exit_now(code: int) -> NoReturn:
    """Shut Ray down (a no-op when `serve_until_stopped` did) and end the process at once, without the
    interpreter's teardown: everything fescale started is stopped by now. (A 60 s hang and exit 1
    with "Failed to connect to GCS" seen before came from the start-up thread ending first and the
    kernel killing the local cluster under the driver, see `Startup.release`.)"""
    ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
