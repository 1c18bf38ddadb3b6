"""Train-and-test runs side by side in worker processes, each with its share of the CPU's threads: how the
methods table runs its seeds with `--jobs N`.

On a CPU with few cores one run leaves them partly idle: the data pipeline, the optimizer and the Python
between operations run on one thread, and on the 2-core development machine a Demo step is only 1.5x faster
on two threads than on one. Two one-thread runs side by side take 0.51 s per step each where one two-thread run
takes 0.35 s, so the pair finishes 1.37x sooner than the same runs one after another (PHP demo, bf16). Each run
is still independent (its own seed, data order and precision choice); its floating-point sums may differ from a
two-thread run in the last bits.

Each run gets a process of its own (not a pool: one worker killed, by the kernel's out-of-memory killer say,
would break a pool and fail every run queued on it), so a killed run fails alone. A worker appends the run's
console output to its own file (two runs would interleave on one terminal); the caller gets one `RunResult` per
run, with the error's one line when it failed. A run whose folder another process holds (a second `sh run.sh
methods` training the same run) is tried again after every other run has started, and then waits for the folder:
once free, that run is finished (only tested again) or is continued. Ctrl-C stops every worker and raises
KeyboardInterrupt once they have ended.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections import deque
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from utils.cli import integer
from utils.errors import UserError
from utils.runlock import LOCK_NAME, FolderBusy

MAX_AUTO_JOBS = 4  # several one-thread demo runs fit in memory; more rarely pays on a shared machine
STOP_SECONDS = 10  # after Ctrl-C, how long a worker may take to unwind before it is killed
RETRY_SECONDS = 10  # a lock file can outlive its holder (killed): the folder is tried again this often
STARTED = "started"  # a worker's first message: its run may have begun writing, so Ctrl-C lets it unwind


@dataclass(frozen=True)
class Run:
    label: str  # what the progress lines call it, e.g. "PHP seed 2"
    values: Dict[str, Any]  # the run's options (Config.to_dict), rebuilt in the worker with its plug-ins
    config_file: str  # the preset it came from (recorded in provenance)
    console: str  # the file that gets the run's console output


@dataclass(frozen=True)
class RunResult:
    label: str
    code: int  # the exit code, as train.py / test.py would exit: 0 trained and tested
    seconds: float
    error: str = ""
    busy: bool = False  # its folder was in use by another process: nothing was done


def job_count(jobs: str, runs: int, device: str, cores: Optional[int] = None) -> int:
    """How many runs go side by side. `auto`: one per core, at most MAX_AUTO_JOBS and the number of runs, on
    the CPU; 1 on a GPU (runs on one card would contend for it). A number is obeyed."""
    if jobs != "auto":
        try:
            count = integer(str(jobs).strip())
        except ValueError:
            count = 0
        if count < 1:
            raise UserError(f"command line: --jobs {jobs!r}: expected auto or a whole number of 1 or more")
        return count
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return 1
    cores = cores or torch.get_num_threads()
    return max(1, min(cores, MAX_AUTO_JOBS, runs))


def threads_per_job(jobs: int, cores: Optional[int] = None) -> int:
    return max(1, (cores or torch.get_num_threads()) // jobs)


def wait_for_folder(run_dir: str, seconds: float = RETRY_SECONDS) -> None:
    """Until the run folder's lock file is gone (its holder released it), at most `seconds`."""
    deadline = time.monotonic() + seconds
    while os.path.exists(os.path.join(run_dir, LOCK_NAME)) and time.monotonic() < deadline:
        time.sleep(0.5)


def train_and_test_when_free(cfg, config_file: str, wait: bool) -> int:
    """processor.presets.train_and_test; FolderBusy unless `wait`, which waits for the folder's holder instead."""
    from processor.presets import train_and_test  # the parent of side-by-side runs need not import training

    said = False
    while True:
        try:
            return train_and_test(cfg, config_file)
        except FolderBusy as e:
            if not wait:
                raise
            if not said:
                print(f"note: {e}; waiting for it", flush=True)
                said = True
            wait_for_folder(cfg.run_dir)


def run_here(cfg, config_file: str, label: str, wait: bool) -> RunResult:
    """One run in this process; a UserError becomes the result's exit code and line, as train.py would exit."""
    began = time.time()
    try:
        return RunResult(label, train_and_test_when_free(cfg, config_file, wait), time.time() - began)
    except FolderBusy as e:
        return RunResult(label, e.exit_code, time.time() - began, str(e), busy=True)
    except UserError as e:
        print(f"error: {e}", flush=True)
        return RunResult(label, e.exit_code, time.time() - began, str(e))


def _run_in_worker(run: Run, threads: int, wait: bool = False) -> RunResult:
    # Imported here: the worker is a fresh (spawned) interpreter, and the parent's module need not import training.
    # Before the config is rebuilt: importing training registers the options of the methods' heads and losses.
    import processor.presets  # noqa: F401
    from utils.config import config_from_values

    torch.set_num_threads(threads)
    began = time.time()
    os.makedirs(os.path.dirname(run.console) or ".", exist_ok=True)
    # Appended, never truncated: another `sh run.sh methods` may be writing this run's console at the same time
    # (it holds the run, which this one then waits for).
    with open(run.console, "a", encoding="utf-8") as out, redirect_stdout(out), redirect_stderr(out):
        print(f"===== {run.label}: {'waiting for its folder, then ' if wait else ''}train and test, pid {os.getpid()}, "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        try:
            cfg = config_from_values(run.values, run.config_file or run.label)
            return run_here(cfg, run.config_file, run.label, wait)
        except UserError as e:
            print(f"error: {e}", flush=True)
            return RunResult(run.label, e.exit_code, time.time() - began, str(e))
        except KeyboardInterrupt:
            # Ctrl-C reaches a worker twice (from the terminal, then from the parent's stop): the first unwinds it.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            print("interrupted", flush=True)
            return RunResult(run.label, 130, time.time() - began, "interrupted")
        except Exception as e:  # noqa: BLE001 - the other runs go on; the traceback is in the run's console file
            traceback.print_exc()
            return RunResult(run.label, 1, time.time() - began,
                             f"{type(e).__name__}: {str(e)[:300]} (traceback in {run.console})")


def _worker(run: Run, threads: int, wait: bool, results) -> None:
    results.send(STARTED)
    try:
        # Blocked by the parent while it started this process (see _Workers.start): a Ctrl-C that came during
        # Python's start-up is delivered here, where it ends the run quietly.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        result = _run_in_worker(run, threads, wait)
    except KeyboardInterrupt:
        result = RunResult(run.label, 130, 0.0, "interrupted")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's stop() may interrupt again: the result is ready
    results.send(result)
    results.close()


def _ended(run: Run, exitcode: Optional[int], seconds: float) -> RunResult:
    """The result of a worker that ended without sending one: killed, or it failed before it could."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
        why = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        # 128 + the signal: the status a shell reports for a command killed so.
        return RunResult(run.label, 128 - exitcode, seconds, f"its worker process was killed by {name}{why}; "
                                                             f"console in {run.console}")
    return RunResult(run.label, exitcode or 1, seconds, f"its worker process ended with exit code {exitcode} "
                                                        f"before reporting; console in {run.console}")


class _Workers:
    """The worker processes running now, by the index of their run."""

    def __init__(self, runs: Sequence[Run], threads: int):
        self.runs, self.threads = runs, threads
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
        self.running: Dict[int, Tuple[Any, Any, float]] = {}  # index -> (process, receiving end, start time)

    def start(self, index: int, wait: bool) -> None:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_worker, args=(self.runs[index], self.threads, wait, send),
                                       name=f"run {self.runs[index].label}")
        # SIGINT is held back while the worker starts: here it would leave a started process unknown to stop(),
        # and the worker (which inherits the mask) would print a traceback from its imports instead of ending.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            process.start()
            self.running[index] = (process, receive, time.time())
        finally:
            send.close()  # the child's end: only the child holds it now
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def ended(self) -> List[Tuple[int, RunResult]]:
        """(index, result) of the workers that have ended, after waiting for at least one."""
        by_sentinel = {process.sentinel: index for index, (process, _, _) in self.running.items()}
        ready = multiprocessing.connection.wait(list(by_sentinel))
        return [(by_sentinel[s], self._collect(by_sentinel[s])) for s in ready]

    def _collect(self, index: int) -> RunResult:
        process, receive, began = self.running.pop(index)
        process.join()
        result = None
        try:
            while receive.poll():
                result = receive.recv()
        except (EOFError, OSError):
            pass
        receive.close()
        return result if isinstance(result, RunResult) else _ended(self.runs[index], process.exitcode,
                                                                    time.time() - began)

    def stop(self) -> None:
        """Every worker interrupted as Ctrl-C would (it unwinds, its data loaders stop), killed if it has not ended
        within STOP_SECONDS; one still starting Python (seconds of imports), which has written nothing, is killed
        at once, and a second Ctrl-C kills them all."""
        for process, receive, _ in self.running.values():
            try:
                if receive.poll():  # its STARTED: the run may be writing
                    os.kill(process.pid, signal.SIGINT)
                else:
                    process.kill()
            except (ProcessLookupError, OSError):
                pass
        deadline = time.monotonic() + STOP_SECONDS
        try:
            for process, _, _ in self.running.values():
                process.join(max(0.0, deadline - time.monotonic()))
        finally:
            for process, receive, _ in self.running.values():
                if process.is_alive():
                    process.kill()
                process.join()
                receive.close()
            self.running.clear()


def run_side_by_side(runs: Sequence[Run], jobs: int, on_done: Callable[[int, RunResult], None],
                     cores: Optional[int] = None) -> List[RunResult]:
    """Every run in its own spawned worker, at most `jobs` at once, in the given order; `on_done(index, result)` is
    called in this process as each finishes. Returns the results in the order of `runs`. On KeyboardInterrupt
    (Ctrl-C to this process or its group) no run is started any more and every worker is stopped first."""
    workers = _Workers(runs, threads_per_job(jobs, cores))
    queue = deque((index, False) for index in range(len(runs)))
    busy: deque = deque()  # runs whose folder was in use: started again, waiting for it, once the queue is empty
    results: List[Optional[RunResult]] = [None] * len(runs)
    try:
        while queue or busy or workers.running:
            while len(workers.running) < jobs and (queue or busy):
                workers.start(*(queue or busy).popleft())
            for index, result in workers.ended():
                if result.busy:
                    print(f"=== {result.label}: {result.error}; trying again after the other runs", flush=True)
                    busy.append((index, True))
                    continue
                results[index] = result
                on_done(index, result)
    except KeyboardInterrupt:
        workers.stop()
        raise
    return [r for r in results if r is not None]
