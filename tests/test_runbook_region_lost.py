"""runbooks/region-lost.md, run as on-call would: its commands in order, against a lost region.

The runbook's ```sh lines of "Diagnose" and "Fix" are taken from the file itself, their
placeholders filled in, and each is run; a line's comment names its exit code when it is
not 0 ("exit 1"). A runbook that promises what the commands do not do fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import psycopg
from conftest import PgServer
from lms import populate
from support import directory_source, make_setup, postgres_source
from test_runbooks import RUNBOOKS, sh_lines, words

RUNBOOK = RUNBOOKS / "region-lost.md"


def runbook_commands(first: str, last: str) -> list[tuple[str, int]]:
    """(command, expected exit code) of the drctl lines from a line starting with `first`
    to the one starting with `last` (headings or numbered steps)."""
    text = RUNBOOK.read_text().splitlines()
    start = next(i for i, line in enumerate(text, 1) if line.startswith(first))
    end = next(i for i, line in enumerate(text, 1) if line.startswith(last))
    out = []
    for line in sh_lines(RUNBOOK):
        if start < line.lineno < end and line.text.startswith("drctl "):
            code = re.search(r"#.*\bexit (\d)", line.text)
            out.append((line.text, int(code.group(1)) if code else 0))
    return out


def test_region_lost_runbook_runs_in_order(tmp_path: Path, pg_database: str,
                                           pg_server: PgServer, moto_region_factory: Any) -> None:
    populate(pg_database)
    files = tmp_path / "moodledata"
    (files / "course").mkdir(parents=True)
    (files / "course" / "intro.html").write_text("<p>hello</p>")
    eu = moto_region_factory("eu-frankfurt", "eu-central-1", "europe")
    us = moto_region_factory("us-virginia", "us-east-1", "north-america")
    setup = make_setup(tmp_path, [eu.toml(), us.toml()],
                       [postgres_source("lms-db", pg_database, tier="paid"),
                        directory_source("lms-files", files, tier="free")])
    assert setup.drctl("backup").exit_code == 0
    assert setup.drctl("drill", "run").exit_code == 0
    eu.server.stop()  # the primary region is gone

    kinds = {"lms-db": "postgres", "lms-files": "directory"}
    new_dsn = f"{pg_server.host} port={pg_server.port}"
    restored_root = tmp_path / "restored"
    restored_files = restored_root / "lms-files"  # `recovery run --to-dir`: one per source

    def run(commands: list[tuple[str, int]]) -> list[list[str]]:
        ran = []
        for text, expected in commands:
            command = " ".join(words(text))  # up to the first pipe; no comment
            if "--to" in command and "SOURCE" in command:
                # Fix step 2: the DSN line for databases, the folder line for file trees.
                wanted = "postgres" if "host=" in command else "directory"
                sources = [s for s, k in kinds.items() if k == wanted]
            else:
                sources = list(kinds) if "SOURCE" in command else [""]
            for source in sources:
                args = [a.replace("SURVIVING_REGION", "us-virginia").replace("SOURCE", source)
                        .replace("LOST_REGION", "eu-frankfurt")
                        .replace("/srv/restore", str(restored_root))
                        .replace("NEW_DB_HOST", new_dsn).replace("DBNAME", "lms_restored")
                        .replace("USER", pg_server.user)
                        .replace("/srv/moodledata/TENANT", str(restored_files))
                        for a in words(text)[1:]]
                result = setup.drctl(*args)
                ran.append(args[:2])
                assert result.exit_code == expected, (text, result.stdout, result.stderr)
                if "--json" in args:
                    json.loads(result.stdout)
        return ran

    ran = run(runbook_commands("## Diagnose", "3. Back up the new systems"))
    assert len(ran) >= 7, ran
    # The plan came first; the restores really happened, from the surviving region.
    assert ran[0] == ["recovery", "plan"] and ran.count(["recovery", "run"]) == 1
    assert (restored_files / "course" / "intro.html").read_text() == "<p>hello</p>"
    with psycopg.connect(pg_server.dsn("lms-db")) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (200,)

    # Fix step 3 as written: sources point at the new systems, a new region on a third
    # site replaces the lost one; then its commands back up and copy everything there.
    paris = moto_region_factory("eu-paris", "eu-west-3", "europe")
    config = setup.config.read_text()
    assert eu.toml() in config and pg_database in config
    setup.config.write_text(config.replace(eu.toml(), paris.toml())
                            .replace(pg_database, pg_server.dsn("lms-db"))
                            .replace(f'path = "{files}"', f'path = "{restored_files}"'))
    run(runbook_commands("3. Back up the new systems", "## Confirm recovery"))
    run(runbook_commands("## Confirm recovery", "## Whom to tell"))
