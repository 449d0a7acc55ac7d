"""README numbers and figures tied to the committed outputs of the default chain.

A number in README.md that a committed output holds carries its source in an HTML comment right after it
(invisible when rendered): the file, the dotted key and a Python format spec,

    train accuracy 99.22%<!-- value: inspect/gen-0/statistics.json train.accuracy .2% -->

and every image the README shows is a committed output itself (a path under an output that dvc.lock
records, not git-ignored), never a copy under docs/. Every such source must also be byte for byte the
output dvc.lock records (its md5, a folder's `.dir` md5), so numbers and figures come from one committed run.
The Results section's tables of bancache's own experiments carry `<!-- rows: benchmarks/results/X.md -->`
(the table the experiment wrote): their rows are checked against it, not rewritten. A table that also
carries `<!-- paired: benchmarks/results/X.json -->` (the experiment's per-seed numbers, a "runs" list) has
each difference column ("BAN-k − Control-k": JSON columns BAN-k minus Control-k of row k) recomputed from
that JSON, mean [95% t-interval], and followed by a "detectable (80% power)" column: the smallest mean
difference its seeds could have detected (`pipeline.core.stats.detectable_effect` of the differences' sample
sd), also recomputed; the rows check reads a row without its detectable cells.
Check, or rewrite every number from its source:

    python -m tests.docs_values            # one line per drifted number or bad figure, exit 1; else exit 0
    python -m tests.docs_values --write    # rewrite the numbers in place (idempotent), then check

tests/test_docs.py runs the check on the committed README and on drifted copies of it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline.core.stats import detectable_effect
from pipeline.results.paired import DASH, format_diff, paired_columns

README = "README.md"
NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?%?"
COMMENT = r"<!-- value: (?P<file>\S+) (?P<key>\S+) (?P<spec>\S+) -->"
MARKED = re.compile(rf"(?P<shown>{NUMBER})?{COMMENT}")
IMAGE = re.compile(r"!\[[^\]]*\]\((?P<path>[^)\s]+)\)")
ROWS = re.compile(r"<!-- rows: (?P<file>\S+) -->")
PAIRED = re.compile(r"<!-- paired: (?P<file>\S+) -->")
DETECTABLE = "detectable (80% power)"  # the header of a difference column's power column
MINUS = " − "  # in a header, a difference column: "BAN-k − Control-k"


@dataclass(frozen=True)
class Value:
    """One marked number: where it is in the README, what it shows, and where it comes from."""

    line: int
    start: int  # the shown number's offsets in the README text (both the comment's when no number precedes it)
    end: int
    shown: str | None
    file: str
    key: str
    spec: str

    def where(self) -> str:
        return f"{README}:{self.line}"


def metric(data: Any, key: str) -> Any:
    """The value of dotted `key` (`train.accuracy`) in a parsed metrics file: every metric key is read here."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(part)
        data = data[part]
    return data


def marked_values(text: str) -> list[Value]:
    """Every `<!-- value: ... -->` of the README, with the number just before it (None if there is none)."""
    found = []
    for m in MARKED.finditer(text):
        start, end = (m.start("shown"), m.end("shown")) if m["shown"] else (m.start(), m.start())
        line = text.count("\n", 0, start) + 1
        found.append(Value(line, start, end, m["shown"], m["file"], m["key"], m["spec"]))
    return found


def locked_outputs(root: Path) -> dict[str, str]:
    """Every output that dvc.lock records for the default chain's stages -> its md5 (a folder's ends in .dir)."""
    lock = YAML(typ="safe", pure=True).load((root / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock.get("stages", {}).values() for out in stage.get("outs", [])}


def dvc_md5(path: Path) -> str:
    """The md5 DVC 3 records for `path`: of its bytes; for a folder, of the JSON list of its files' md5 and
    relpath (sorted by relpath), with ".dir" appended."""
    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    entries = [{"md5": hashlib.md5(p.read_bytes()).hexdigest(), "relpath": rel} for rel, p in files]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


class Committed:
    """Whether a file is (part of) an output of the committed run that dvc.lock records, byte for byte."""

    def __init__(self, root: Path) -> None:
        self.root, self.outs = root, locked_outputs(root)
        self.hashes: dict[str, str] = {}

    def problem(self, rel: str, fix: str) -> str | None:
        out = next((o for o in self.outs if rel == o or rel.startswith(o.rstrip("/") + "/")), None)
        if out is None:
            return f"{rel} is not an output that dvc.lock records: {fix}"
        if not (self.root / rel).exists():
            return f"{rel} does not exist (run `dvc repro` and commit it)"
        if out not in self.hashes:
            self.hashes[out] = dvc_md5(self.root / out)
        if self.hashes[out] != self.outs[out]:
            return f"{out} is not the output dvc.lock records (another run's? run `dvc repro` and commit both)"
        if _git_ignored(self.root, rel):
            return f"{rel} is git-ignored, so it is not committed: unignore it"
        return None


def expected(committed: Committed, v: Value) -> tuple[str | None, str | None]:
    """(the number `v`'s source gives, formatted by its spec; or None and the problem)."""
    problem = committed.problem(v.file, "take README numbers from the default chain's outputs")
    if problem:
        return None, f"{v.where()}: {problem}"
    try:
        value = metric(json.loads((committed.root / v.file).read_text()), v.key)
    except KeyError as e:
        return None, f"{v.where()}: {v.file} has no key {v.key!r} (missing {e.args[0]!r}): fix the comment's key"
    try:
        return format(value, v.spec), None
    except (TypeError, ValueError):
        return None, f"{v.where()}: {v.file} {v.key} = {value!r} does not take the format {v.spec!r}"


def number_problems(committed: Committed, text: str) -> list[str]:
    """One line per marked number that differs from its source (or whose source cannot be read)."""
    problems = []
    for v in marked_values(text):
        want, problem = expected(committed, v)
        if problem:
            problems.append(problem)
        elif v.shown is None:
            problems.append(f"{v.where()}: no number before the comment (its source gives {want})")
        elif v.shown != want:
            problems.append(f"{v.where()}: shows {v.shown}, but {v.file} {v.key} gives {want}")
    return problems


def _git_ignored(root: Path, path: str) -> bool:
    if not (root / ".git").exists():
        return False
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=root, check=False).returncode == 0


def figure_problems(committed: Committed, text: str) -> list[str]:
    """One line per README image that is not a committed output of the chain (a copy, another run's, missing)."""
    problems = []
    for m in IMAGE.finditer(text):
        fix = "link the committed figure (inspect/gen-K/figures/...) instead of a copy"
        problem = committed.problem(m["path"], fix)
        if problem:
            problems.append(f"{README}:{text.count(chr(10), 0, m.start()) + 1}: image {problem}")
    return problems


def cells(row: str) -> tuple[str, ...]:
    """A markdown table row's cells, stripped, bold marks aside."""
    return tuple(cell.strip() for cell in row.replace("**", "").strip().strip("|").split("|"))


def next_table(text: str, end: int) -> tuple[int, list[str]]:
    """(the README line of its header, its lines) of the first table after offset `end` (a marker's end)."""
    lines = text[end:].split("\n")
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[first:]))
    return text.count("\n", 0, end) + 1 + first, table


def marked(root: Path, text: str, marker: re.Pattern[str], problems: list[str]) -> Iterator[tuple[re.Match[str], Path]]:
    """Each `marker` comment of `text` and the file it names under `root`; a file that does not exist is a
    line in `problems` instead."""
    for m in marker.finditer(text):
        path = root / m["file"]
        if path.is_file():
            yield m, path
        else:
            problems.append(f"{README}:{text.count(chr(10), 0, m.start()) + 1}: {m['file']} does not exist")


def table_problems(root: Path, text: str) -> list[str]:
    """One line per body row of a README table marked `<!-- rows: FILE -->` (the next table after the
    comment) that is not a row of FILE, the experiment's own table (bold marks, spacing and the README's
    detectable columns aside; headers may differ)."""
    problems: list[str] = []
    for m, path in marked(root, text, ROWS, problems):
        theirs = {cells(line) for line in path.read_text().splitlines() if line.startswith("|")}
        start, table = next_table(text, m.end())
        keep = [j for j, head in enumerate(cells(table[0])) if head != DETECTABLE]
        for i, row in enumerate(table[2:], start=start + 2):  # after the header and its separator
            shown = cells(row)
            if tuple(shown[j] for j in keep if j < len(shown)) not in theirs:
                problems.append(f"{README}:{i}: table row not in {m['file']}: {row}")
    return problems


def difference_cells(runs: list[dict[str, Any]], header: tuple[str, ...], k: str) -> dict[int, str]:
    """What row `k`'s difference cells and their detectable cells show, by column: from the JSON's runs
    (empty on a row that is not a generation, a dash where the runs lack the columns)."""
    want = {}
    for j, head in enumerate(header):
        if MINUS not in head:
            continue
        a, b = (re.sub(r"(?<=[-*])k\b", k, side.strip()) for side in head.split(MINUS))
        p = paired_columns(runs, a, b) if k.isdigit() else None
        want[j] = format_diff(p) if p else DASH if k.isdigit() else ""
        if j + 1 < len(header) and header[j + 1] == DETECTABLE:
            want[j + 1] = f"{detectable_effect(p.sd, p.n):.2f}" if p else want[j]
    return want


def paired_problems(root: Path, text: str) -> list[str]:
    """One line per difference or detectable cell of a table marked `<!-- paired: FILE.json -->` that its
    JSON's runs do not give, and per difference column without a detectable column after it."""
    problems: list[str] = []
    for m, path in marked(root, text, PAIRED, problems):
        runs = json.loads(path.read_text())["runs"]
        start, table = next_table(text, m.end())
        header = cells(table[0])
        for j, head in enumerate(header):
            if MINUS in head and header[j + 1 : j + 2] != (DETECTABLE,):
                problems.append(f"{README}:{start}: column {head!r} has no {DETECTABLE!r} column after it: add one")
        for i, row in enumerate(table[2:], start=start + 2):
            shown = cells(row)
            for j, want in difference_cells(runs, header, shown[0]).items():
                got = shown[j] if j < len(shown) else ""
                if got != want:
                    cell = header[j] if MINUS in header[j] else f"{DETECTABLE} of {header[j - 1]}"
                    problems.append(f"{README}:{i}: {cell}, row {shown[0]}, shows {got}, but {m['file']} gives {want}")
    return problems


def check(root: Path) -> list[str]:
    """Every problem of the README under `root`: drifted numbers, figures, then experiment tables."""
    text, committed = (root / README).read_text(), Committed(root)
    tables = table_problems(root, text) + paired_problems(root, text)
    return number_problems(committed, text) + figure_problems(committed, text) + tables


def write(root: Path) -> int:
    """Rewrite every marked number whose source can be read; returns how many changed."""
    path = root / README
    text = path.read_text()
    changed, pieces, at, committed = 0, [], 0, Committed(root)
    for v in marked_values(text):
        want, problem = expected(committed, v)
        if problem or want is None or v.shown == want:
            continue
        pieces += [text[at : v.start], want]
        at, changed = v.end, changed + 1
    if changed:
        path.write_text("".join(pieces) + text[at:])
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.docs_values", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project root (default: .)")
    parser.add_argument("--write", action="store_true", help="rewrite the README's numbers from their sources")
    args = parser.parse_args(argv)
    if args.write:
        print(f"{README}: {write(args.root)} numbers rewritten from the committed outputs")
    problems = check(args.root)
    for line in problems:
        print(line)
    if not problems:
        text = (args.root / README).read_text()
        n, figs = len(marked_values(text)), len(IMAGE.findall(text))
        print(f"{README}: {n} numbers match the committed outputs; its {figs} figures are committed outputs")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
