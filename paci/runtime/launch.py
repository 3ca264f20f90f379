"""Process launch: `paci ... --nproc P` spawns P local ranks itself; torchrun works unchanged.

No launcher protocol of our own: ranks find each other through torch.distributed's env://
rendezvous (MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE), which torchrun sets and which
`spawn` sets for its children. Backend from the device: NCCL for CUDA, gloo for CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing as mp
import multiprocessing.forkserver as forkserver
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from paci.errors import STOPPED, exit_code
from paci.runtime import mesh
from paci.runtime.mesh import env_rank

log = logging.getLogger(__name__)


class Stopped(KeyboardInterrupt):
    """A requested stop took effect: the run saved its checkpoint after `step` and stopped there."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after step {step}, at a checkpoint")
        self.step = step


class StopRequest:
    """A stop asked for by a signal: the run drains at its next step boundary (driver.PromptStop),
    saves a checkpoint there and raises Stopped. A second signal interrupts at once
    (KeyboardInterrupt)."""

    def __init__(self, signums: tuple[int, ...], announce: str | None = None) -> None:
        self.signums, self.announce = signums, announce
        self.requested = False

    @contextlib.contextmanager
    def armed(self, when: bool = True) -> Iterator[None]:
        """Handle the signals inside the block (main thread only), if `when`: a run with no drain
        point before its end has nothing to wait for, and its signals keep their meaning."""
        if not when:
            yield
            return
        previous = {signum: signal.getsignal(signum) for signum in self.signums}

        def handler(signum, frame) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            if self.announce:
                print(self.announce, file=sys.stderr, flush=True)

        for signum in self.signums:
            signal.signal(signum, handler)
        try:
            yield
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)


STOPPING = "paci: stopping: draining the pipeline and saving a checkpoint; Ctrl-C again to stop at once"
STOP_SIGNAL = signal.SIGUSR1  # what `spawn(stop_signal=...)` callers send their ranks to ask for a stop
_spawned = False  # set in a rank that `spawn` started: its launcher handles Ctrl-C and SIGTERM


def spawned() -> bool:
    """Was this rank started by `spawn` (whose launcher handles Ctrl-C and SIGTERM), not torchrun?"""
    return _spawned


def stop_signals() -> tuple[int, ...]:
    """The signals that ask this rank for a stop: the launcher's, or, under torchrun (which passes
    SIGINT and SIGTERM on to its workers), those."""
    return (STOP_SIGNAL,) if _spawned else (signal.SIGINT, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise ValueError(f"port {port} is in use; pick another with --port or leave it out") from None


MAX_LOCAL_PROCESSES = 64  # each rank is a Python process with torch loaded (a few hundred MB)


def check_nproc(nproc: int) -> None:
    if nproc > MAX_LOCAL_PROCESSES:
        raise ValueError(f"{nproc:,} stages would start {nproc:,} processes on this machine; paci starts at most "
                         f"{MAX_LOCAL_PROCESSES} (one per stage): use fewer --stages")


def threads_per_rank(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


# ----------------------------------------------------------------------------------------------


HEARTBEAT_S = 10.0  # a rank whose heartbeat thread has been silent this long is frozen (stopped, or hung holding the GIL)


def start_fork_server(entry: Callable[[Any], int], preload: tuple[str, ...] = ()):
    """The multiprocessing context `spawn` starts ranks with: they fork from one server process that
    imported torch, the torch._dynamo that torch.optim pulls in, `entry`'s module and the modules
    `preload` names once, where each rank would otherwise import them itself (about 2.4 CPU-seconds
    a process for torch alone; benchmarks/startup.py). Call it early to let the server import while
    this process does other work; later calls use the running server."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "torch._dynamo", entry.__module__, *preload])
    forkserver.ensure_running()
    return ctx


def spawn(entry: Callable[[Any], int], payload: Any, nproc: int, port: int | None = None,
          threads: int | None = None, grace_s: float = 10.0, heartbeat_s: float = HEARTBEAT_S,
          stop_signal: int | None = None) -> int:
    """Run `entry(payload)` on `nproc` fresh ranks (forked from a fork server); return 0 if all succeed.

    Every rank prints its own errors (prefixed with its rank). If one rank fails, the others get
    `grace_s` to notice through their P2P timeouts, then are terminated: no orphans are left.
    Every rank also beats a heartbeat from a thread of its own (a rank waiting for a peer still
    beats); one silent for `heartbeat_s` is named as frozen and the run is stopped at once, long
    before its neighbours' receives would time out and blame themselves.

    Ctrl-C (or SIGTERM, which `paci` turns into one) stops the ranks at once; with `stop_signal`,
    the first one is passed on to the ranks as that signal instead (they drain, save and stop:
    StopRequest) and the second stops them at once. KeyboardInterrupt either way.
    """
    check_nproc(nproc)
    if port is None:
        port = free_port()
    else:
        check_port(port)
    ctx = start_fork_server(entry)
    threads = threads or threads_per_rank(nproc)
    beats = [ctx.Value("d", 0.0, lock=False) for _ in range(nproc)]  # 0: not started yet
    env = dict(os.environ)  # as a spawned process would have it (the server keeps the environment it started with)
    procs = [ctx.Process(target=_child, args=(entry, payload, rank, nproc, port, threads, beats[rank], env,
                                              os.getpid()), name=f"paci-rank{rank}") for rank in range(nproc)]
    for proc in procs:
        proc.start()
    try:
        return _supervise(procs, grace_s, beats, heartbeat_s)
    except KeyboardInterrupt:
        if stop_signal is None:
            _stop(procs)
            raise
    # Ctrl-C or SIGTERM: ask the ranks to drain, save and stop (driver.PromptStop), and wait for them
    print(STOPPING, file=sys.stderr, flush=True)
    for proc in procs:
        if proc.exitcode is None:
            os.kill(proc.pid, stop_signal)
    try:
        code = _supervise(procs, grace_s, beats, heartbeat_s, stopping=True)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    if code == STOPPED:
        raise KeyboardInterrupt
    return code




def _supervise(procs: list, grace_s: float, beats: list, heartbeat_s: float, stopping: bool = False) -> int:
    first_failure: tuple[int, int] | None = None
    deadline = float("inf")
    while any(proc.exitcode is None for proc in procs):
        failed = [(rank, proc.exitcode) for rank, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
        if failed and first_failure is None:  # seen together: one killed by a signal is the cause, not its peers
            first_failure, deadline = min(failed, key=lambda f: (f[1] > 0, f[0])), time.monotonic() + grace_s
        now = time.monotonic()
        frozen = [rank for rank, (proc, beat) in enumerate(zip(procs, beats))
                  if proc.exitcode is None and beat.value and now - beat.value > heartbeat_s]
        if frozen and first_failure is None:
            _stop(procs)
            log.error("paci: rank %d stopped responding (no heartbeat for %.0f s: frozen, stopped or hung); the "
                      "run stopped", frozen[0], heartbeat_s)
            return 1
        if now > deadline:
            _stop(procs)
            break
        time.sleep(0.05)
    if first_failure is None:
        first_failure = next(((r, p.exitcode) for r, p in enumerate(procs) if p.exitcode), None)
    if first_failure is None:
        return 0
    if stopping and all(proc.exitcode in (0, STOPPED) for proc in procs):
        return STOPPED
    rank, code = first_failure
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    log.error("paci: rank %d %s; the run stopped", rank, how)
    return 2 if code == 2 else 1


def _stop(procs: list) -> None:
    for proc in procs:
        if proc.exitcode is None:
            proc.terminate()
    for proc in procs:
        proc.join(5)
        if proc.exitcode is None:
            proc.kill()
            proc.join()


def _child(entry: Callable[[Any], int], payload: Any, rank: int, world_size: int, port: int, threads: int,
           beat, env: dict[str, str], launcher: int) -> None:
    _die_with(launcher)
    _name_process(f"paci-rank{rank}")
    _start_heartbeat(beat)
    os.environ.clear()
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the ranks
    signal.signal(STOP_SIGNAL, _interrupt)  # a stop asked for outside a run's drain points: at once
    global _spawned
    _spawned = True
    torch.set_num_threads(threads)
    sys.exit(run_rank(entry, payload))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _start_heartbeat(beat, every_s: float = 1.0) -> None:
    def run() -> None:
        while True:
            beat.value = time.monotonic()
            time.sleep(every_s)

    threading.Thread(target=run, name="paci-heartbeat", daemon=True).start()


def _die_with(launcher: int) -> None:
    """A rank must not outlive its launcher, even one killed with SIGKILL. The launcher is not the
    rank's parent (the fork server is), so a thread waits on a pidfd of the launcher, readable once
    it has exited (Linux 5.3+; elsewhere the thread polls), and then ends the rank."""
    def watch(pidfd: int | None) -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while _running(launcher):
                time.sleep(1.0)
        os._exit(1)

    try:
        pidfd = os.pidfd_open(launcher)
    except ProcessLookupError:  # it died before this rank got here
        os._exit(1)
    except (AttributeError, OSError):
        pidfd = None
    threading.Thread(target=watch, args=(pidfd,), name="paci-launcher-watch", daemon=True).start()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def _name_process(name: str) -> None:
    """Show the rank as `name` in ps and top (Linux: the process's comm), where rank_pids finds it."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(15, name.encode()[:15])  # PR_SET_NAME


def rank_pids(launcher: int) -> list[int]:
    """The live ranks `spawn` started in process `launcher`, in rank order (Linux; for tests and drills)."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
            if rest[0] != "Z":
                parents[int(entry.name)], names[int(entry.name)] = int(rest[1]), name
    below, frontier = set(), {launcher}
    while frontier:  # every descendant: the ranks are the fork server's children
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - below
        below |= frontier
    ranks = [(int(names[pid][len("paci-rank"):]), pid) for pid in below
             if names[pid].startswith("paci-rank") and names[pid][len("paci-rank"):].isdigit()]
    return [pid for _, pid in sorted(ranks)]


def run_rank(entry: Callable[[Any], int], payload: Any) -> int:
    """Call `entry` in this rank: logging from rank 0 only, errors from any rank with the rank named."""
    info = env_rank()
    rank = info.rank if info else 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)
    try:
        return entry(payload)
    except (ValueError, OSError) as exc:
        log.error("paci: rank %d: error: %s", rank, exc)
        return exit_code(exc)
    except KeyboardInterrupt as exc:  # a requested stop (Stopped), or one that could not wait
        return exit_code(exc)
    except Exception as exc:  # a runtime failure: say which rank, keep the traceback for debugging
        log.error("paci: rank %d: %s: %s", rank, type(exc).__name__, exc)
        if os.environ.get("PACI_DEBUG"):
            traceback.print_exc()
        return exit_code(exc)
    finally:
        mesh.leave()
