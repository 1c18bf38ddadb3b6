"""Train-and-test runs side by side in worker processes, each with its share of the CPU's threads: how the
methods table runs its seeds with `--jobs N`.

On a CPU with few cores one run leaves them partly idle: the data pipeline, the optimizer and the Python
between operations run on one thread, and on the 2-core development machine a Demo step is only 1.5x faster
on two threads than on one. Two one-thread runs side by side take 0.51 s per step each where one two-thread run
takes 0.35 s, so the pair finishes 1.37x sooner than the same runs one after another (PHP demo, bf16). Each run
is still independent (its own seed, data order and precision choice); its floating-point sums may differ from a
two-thread run in the last bits.

A worker writes the run's console output to its own file (two runs would interleave on one terminal); the
caller gets one `RunResult` per run, with the error's one line when it failed.
"""
from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from utils.cli import integer
from utils.errors import UserError

MAX_AUTO_JOBS = 4  # several one-thread demo runs fit in memory; more rarely pays on a shared machine


@dataclass(frozen=True)
class Run:
    label: str  # what the progress lines call it, e.g. "PHP seed 2"
    values: Dict[str, Any]  # the run's options (Config.to_dict), rebuilt in the worker with its plug-ins
    config_file: str  # the preset it came from (recorded in provenance)
    console: str  # the file that gets the run's console output


@dataclass(frozen=True)
class RunResult:
    label: str
    code: int  # the exit code: 0 trained and tested
    seconds: float
    error: str = ""


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


def _run_in_worker(run: Run, threads: int) -> RunResult:
    # Imported here: the worker is a fresh (spawned) interpreter, and the parent's module need not import training.
    from processor.presets import train_and_test
    from utils.config import config_from_values

    torch.set_num_threads(threads)
    began = time.time()
    os.makedirs(os.path.dirname(run.console) or ".", exist_ok=True)
    with open(run.console, "w", encoding="utf-8") as out, redirect_stdout(out), redirect_stderr(out):
        try:
            cfg = config_from_values(run.values, run.config_file or run.label)
            return RunResult(run.label, train_and_test(cfg, run.config_file), time.time() - began)
        except UserError as e:
            print(f"error: {e}", flush=True)
            return RunResult(run.label, 2, time.time() - began, str(e))
        except Exception as e:  # noqa: BLE001 - the other runs go on; the traceback is in the run's console file
            traceback.print_exc()
            return RunResult(run.label, 1, time.time() - began,
                             f"{type(e).__name__}: {e} (traceback in {run.console})")


def run_side_by_side(runs: Sequence[Run], jobs: int, on_done: Callable[[int, RunResult], None],
                     cores: Optional[int] = None) -> List[RunResult]:
    """Every run in a pool of `jobs` spawned workers, in the given order; `on_done(index, result)` is called in
    this process as each finishes. Returns the results in the order of `runs`."""
    threads = threads_per_job(jobs, cores)
    results: List[Optional[RunResult]] = [None] * len(runs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_in_worker, run, threads): i for i, run in enumerate(runs)}
        for future in as_completed(futures):
            index = futures[future]
            try:
                results[index] = future.result()
            except Exception as e:  # noqa: BLE001 - a worker killed (out of memory) or broken; the others' results stand
                results[index] = RunResult(runs[index].label, 1, 0.0, f"the worker process failed: {type(e).__name__}: "
                                                                       f"{e} (console in {runs[index].console})")
            on_done(index, results[index])
    return [r for r in results if r is not None]
