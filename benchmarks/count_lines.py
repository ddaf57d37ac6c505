"""Lines of nst_det (wc -l) per package and for the runner and report groups, at one or more
git revisions, for issue 24's before / after figures.

    .venv/bin/python benchmarks/count_lines.py                 # the working tree
    .venv/bin/python benchmarks/count_lines.py --rev 7e2bd0e --rev HEAD
    .venv/bin/python benchmarks/count_lines.py --spans nst_det/pipeline/run.py   # per function

A revision is read with `git ls-tree` / `git show`, so nothing is checked out.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys

from tabulate import tabulate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = {
    # records.py holds the stage-record readers that were in worker.py
    "runner (run, eta, cluster, worker, steps, records)":
        ["run.py", "eta.py", "cluster.py", "worker.py", "steps.py", "records.py"],
    "report (report, report_methods, describe)":
        ["report.py", "report_methods.py", "describe.py"],
}


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def file_lines(rev: str | None) -> dict:
    """path (relative to the repository) -> line count of every nst_det/*.py and README.md."""
    if rev is None:
        paths = [os.path.relpath(os.path.join(root, name), REPO)
                 for root, _, names in os.walk(os.path.join(REPO, "nst_det"))
                 for name in names if name.endswith(".py")] + ["README.md"]

        def read(path):
            with open(os.path.join(REPO, path), encoding="utf-8") as f:
                return f.read()
    else:
        paths = [p for p in _git("ls-tree", "-r", "--name-only", rev, "nst_det").splitlines()
                 if p.endswith(".py")] + ["README.md"]

        def read(path):
            return _git("show", f"{rev}:{path}")
    return {p: read(p).count("\n") for p in paths}


def summary(lines: dict) -> dict:
    """row label -> lines: nst_det, each package, the two groups and the README."""
    out = {"nst_det": sum(n for p, n in lines.items() if p.startswith("nst_det/"))}
    packages = sorted({p.split("/")[1] for p in lines if p.count("/") >= 2})
    for package in packages:
        out[f"nst_det/{package}"] = sum(n for p, n in lines.items()
                                        if p.startswith(f"nst_det/{package}/"))
    for label, names in GROUPS.items():
        out[label] = sum(lines.get(f"nst_det/pipeline/{n}", 0) for n in names)
    out["README.md"] = lines.get("README.md", 0)
    return out


def spans(path: str) -> list:
    """[(name, lines)] of a file's functions, classes' methods and the rest (docstring, imports,
    constants, class headers), in file order; the lines add up to `wc -l`."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        text = f.read()
    out = []
    for node in ast.parse(text).body:
        members = node.body if isinstance(node, ast.ClassDef) else [node]
        for member in members:
            if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([member.lineno, *(d.lineno for d in member.decorator_list)])
                prefix = f"{node.name}." if member is not node else ""
                out.append((prefix + member.name, member.end_lineno - first + 1))
    return out + [("rest: docstring, imports, constants, class headers, blank lines",
                   text.count("\n") - sum(n for _, n in out))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", action="append", default=[],
                        help="git revision (repeatable); default: the working tree")
    parser.add_argument("--spans", default=None, metavar="FILE",
                        help="instead: the lines of each function of FILE (working tree)")
    args = parser.parse_args(argv)
    if args.spans:
        print(tabulate(spans(args.spans), ["function", "lines"], tablefmt="github"))
        return 0
    revs = args.rev or [None]
    columns = [summary(file_lines(rev)) for rev in revs]
    labels = list(dict.fromkeys(k for c in columns for k in c))
    rows = [[label, *[c.get(label, 0) for c in columns]] for label in labels]
    print(tabulate(rows, ["lines (wc -l)", *[r or "working tree" for r in revs]],
                   tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
