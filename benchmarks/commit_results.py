"""
Commit the finished benchmark results: regenerate the figures and the README's tables, then commit
``benchmarks/results``, ``benchmarks/figures`` and, when nothing but its benchmark marker sections differs from
``HEAD``, ``README.md`` (others edit the rest of the README concurrently; their uncommitted edits are never
committed from here). Only these paths are committed, whatever else is staged.

Usage::

    python -m benchmarks.commit_results               # once
    python -m benchmarks.commit_results --every 1200  # every 20 minutes, while a campaign runs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks.common import REPO_ROOT, timestamp
from benchmarks.report import RETURNS_MARKERS, SPEED_MARKERS
from benchmarks.report import main as report_main

RESULT_PATHS = ("benchmarks/results", "benchmarks/figures")


def git(*args: str) -> subprocess.CompletedProcess[str]:
    """
    Run git in the repository, retrying while another process holds the index lock.

    :param args: git arguments.
    :return: the finished process.
    """
    for _ in range(30):
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        if "index.lock" not in result.stderr:
            return result
        time.sleep(2)
    return result


def without_markers(text: str) -> str:
    """
    :param text: a README.
    :return: it with the benchmark marker sections emptied.
    """
    for start, end in (SPEED_MARKERS, RETURNS_MARKERS):
        head, found, rest = text.partition(start)
        if found and end in rest:
            text = head + start + end + rest.partition(end)[2]
    return text


def commit_once() -> str:
    """
    Regenerate the report and commit the results.

    :return: what happened, one line.
    """
    report_main([])
    paths = list(RESULT_PATHS)
    committed_readme = git("show", "HEAD:README.md").stdout
    readme = (REPO_ROOT / "README.md").read_text()
    if without_markers(readme) == without_markers(committed_readme):
        paths.append("README.md")
    git("add", *paths)
    if not git("diff", "--cached", "--quiet", "--", *paths).returncode:
        return f"{timestamp()} nothing new to commit"
    n_results = len(list((REPO_ROOT / "benchmarks" / "results" / "returns").glob("*/*/seed*.json")))
    message = f"Benchmark results: {n_results} returns cells finished, figures and tables regenerated"
    result = git("commit", "-q", "-m", message, "--", *paths)
    if result.returncode:
        return f"{timestamp()} commit failed: {result.stderr.strip()}"
    readme_note = "" if "README.md" in paths else " (README.md left out: it has other uncommitted edits)"
    return f"{timestamp()} committed {n_results} returns cells{readme_note}"


def main(argv: list[str] | None = None) -> int:
    """
    Command line entry point.

    :param argv: arguments (``sys.argv[1:]`` when ``None``).
    :return: the exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=float, default=0, help="repeat every this many seconds (default: once)")
    args = parser.parse_args(argv)
    while True:
        print(commit_once(), flush=True)
        if args.every <= 0:
            return 0
        time.sleep(args.every)


if __name__ == "__main__":
    sys.exit(main())
