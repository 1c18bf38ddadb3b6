"""processor/parallel_runs.py: how many runs go side by side, and a failing run reported without stopping the others."""
import pytest

from helpers import assert_one_error_line
from processor.parallel_runs import Run, job_count, run_side_by_side, threads_per_job
from utils.errors import UserError


@pytest.mark.parametrize("jobs, runs, device, cores, expected", [
    ("auto", 12, "cpu", 2, 2),
    ("auto", 1, "cpu", 2, 1),  # one run: no worker process
    ("auto", 12, "cpu", 16, 4),  # at most MAX_AUTO_JOBS
    ("auto", 12, "cuda", 16, 1),  # one card: one run at a time
    ("3", 2, "cpu", 2, 3),  # a number is obeyed
])
def test_job_count(jobs, runs, device, cores, expected):
    assert job_count(jobs, runs, device, cores) == expected


@pytest.mark.parametrize("jobs", ["0", "-1", "two", "1.5"])
def test_a_bad_job_count_is_one_line(jobs):
    with pytest.raises(UserError) as e:
        job_count(jobs, 4, "cpu", 2)
    assert_one_error_line(2, f"error: {e.value}", f"--jobs {jobs!r}: expected auto or a whole number")


def test_threads_are_shared_out():
    assert [threads_per_job(j, 8) for j in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_a_failing_run_is_reported_and_the_others_still_run(tmp_path):
    runs = [Run("bad lr", {"lr": "fast"}, "", str(tmp_path / "bad.txt")),
            Run("bad name", {"name": "../x"}, "", str(tmp_path / "name.txt"))]
    seen = []
    results = run_side_by_side(runs, 2, lambda i, r: seen.append(i), cores=2)
    assert sorted(seen) == [0, 1]
    assert [r.label for r in results] == ["bad lr", "bad name"]
    assert all(r.code == 2 for r in results)
    assert "lr" in results[0].error and "\n" not in results[0].error
    assert "error: " in (tmp_path / "bad.txt").read_text()
