"""drdaemon's memory against the number of files in a tree (issue 21.6): flat, or not.

Builds trees of N small files (1,000 per folder), backs each up with
`drctl backup` to two local regions and restores it with `drctl restore`, and
reports drctl's peak RSS (the child's ru_maxrss, from wait4) per N. Not a
test: nothing is asserted; bench/run.py adds its table to the results
(`--rss-file-counts`), or run it alone:

    .venv/bin/python bench/file_counts.py 30000,300000,1000000 [--workdir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PER_FOLDER = 1000


@dataclass
class Row:
    files: int
    backup_rss_mib: float
    restore_rss_mib: float
    backup_s: float
    restore_s: float


def build_tree(root: Path, files: int) -> None:
    """`files` files of a few bytes, PER_FOLDER to a folder, two levels deep."""
    for i in range(0, files, PER_FOLDER):
        folder = root / f"course-{i // 100_000:03d}" / f"week-{i // PER_FOLDER:05d}"
        folder.mkdir(parents=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for j in range(min(PER_FOLDER, files - i)):
                out = os.open(f"submission-{j:04d}.txt", os.O_WRONLY | os.O_CREAT, 0o644,
                              dir_fd=fd)
                os.write(out, b"essay %d\n" % (i + j))
                os.close(out)
        finally:
            os.close(fd)


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of `cmd`, from wait4's rusage of exactly that child."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    secs = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({proc.returncode}): {err[-2000:]!r}")
    return secs, usage.ru_maxrss / 1024


def write_config(work: Path, trees: dict[str, Path]) -> Path:
    sys.path.insert(0, str(ROOT))
    from drdaemon.keys import generate_identity, generate_manifest_key

    keys = work / "keys"
    recipient = generate_identity(keys / "identity.txt")
    generate_manifest_key(keys / "manifest.key")
    text = (f'[daemon]\nstate_dir = "{work / "state"}"\n\n'
            f'[keys]\nrecipients = ["{recipient}"]\nidentity_file = "{keys / "identity.txt"}"\n'
            f'manifest_key_file = "{keys / "manifest.key"}"\n\n'
            '[pipeline]\nzstd_level = 3\nzstd_threads = 2\n\n')
    for i, continent in enumerate(["europe", "north-america"]):
        text += (f'[[regions]]\nname = "local-{i}"\nkind = "local"\ncontinent = "{continent}"\n'
                 f'path = "{work / f"local-{i}"}"\n\n')
    for name, tree in trees.items():
        text += (f'[[sources]]\nname = "{name}"\nkind = "directory"\ntenant = "bench"\n'
                 f'tier = "paid"\npath = "{tree}"\n\n')
    config = work / "drdaemon.toml"
    config.write_text(text)
    return config


def measure(work: Path, counts: list[int], log: bool = True) -> list[Row]:
    """Back up and restore a tree of each size; drctl's peak RSS and seconds."""
    trees = {f"files-{n}": work / f"tree-{n}" for n in counts}
    config = write_config(work, trees)
    drctl = [str(VENV_BIN / "drctl"), "--config", str(config)]
    rows = []
    for n in counts:
        tree = trees[f"files-{n}"]
        started = time.monotonic()
        build_tree(tree, n)
        if log:
            print(f"  tree of {n} files built in {time.monotonic() - started:.0f}s", flush=True)
        b_secs, b_rss = peak_rss([*drctl, "backup", "--source", f"files-{n}", "--json"])
        target = work / f"restored-{n}"
        r_secs, r_rss = peak_rss([*drctl, "restore", "latest", "--source", f"files-{n}",
                                  "--to", str(target), "--region", "local-0", "--json"])
        rows.append(Row(n, b_rss, r_rss, b_secs, r_secs))
        if log:
            print(f"  {n} files: drctl peak RSS backup {b_rss:.0f} MiB ({b_secs:.0f}s), "
                  f"restore {r_rss:.0f} MiB ({r_secs:.0f}s)", flush=True)
        shutil.rmtree(tree)
        shutil.rmtree(target)
    return rows


def table(rows: list[Row]) -> list[str]:
    """The Markdown lines bench/run.py appends to its results."""
    lines = ["| files | drctl backup peak RSS (MiB) | s | drctl restore peak RSS (MiB) | s |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.files:,} | {r.backup_rss_mib:.0f} | {r.backup_s:.0f} | "
              f"{r.restore_rss_mib:.0f} | {r.restore_s:.0f} |" for r in rows]
    for what, vals in (("backup", [r.backup_rss_mib for r in rows]),
                       ("restore", [r.restore_rss_mib for r in rows])):
        if len(vals) > 1:
            lines.append(f"\ndrctl {what} peak RSS spread across file counts: "
                         f"{(max(vals) / min(vals) - 1) * 100:.1f} % (target: within 10 %).")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("counts", help="comma-separated file counts, e.g. 30000,300000,1000000")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    counts = [int(x) for x in args.counts.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="drbench-files-", dir=args.workdir or "/var/tmp"))
    try:
        rows = measure(work, counts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(table(rows)))
    print(json.dumps([r.__dict__ for r in rows]))


if __name__ == "__main__":
    main()
