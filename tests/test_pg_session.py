"""Naming PostgreSQL servers in messages, children's environment, reading lock failures:
pure functions (properties and examples), and connect failures against the real server."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PgServer
from hypothesis import given
from hypothesis import strategies as st

from drdaemon.errors import SourceError
from drdaemon.restore import target_hint
from drdaemon.sources.pg_session import (
    child_env,
    connect,
    describe,
    is_lock_timeout,
    locked_table,
)

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)


@given(host=st.one_of(words, words.map(lambda w: f"/run/{w}")), port=st.integers(1, 65535),
       db=words, user=words, secret=words.map(lambda w: f"S3cr3t{w}"))
def test_described_dsns_never_show_a_password_and_sockets_are_query_parameters(
        host: str, port: int, db: str, user: str, secret: str) -> None:
    text = describe(f"host={host} port={port} dbname={db} user={user} password={secret}")
    assert secret not in text
    if host.startswith("/"):
        assert text == f"postgres://{user}@/{db}?host={host}&port={port}"
    else:
        assert text == f"postgres://{user}@{host}:{port}/{db}"


def test_described_examples() -> None:
    assert describe("service=lms") == "service lms"
    assert describe("service=lms dbname=moodle") == "service lms, database moodle"
    assert describe("host=/run/postgresql port=5432 dbname=x") == \
        "postgres:///x?host=/run/postgresql&port=5432"
    assert describe("postgresql://u:pw@db.example:6432/app") == "postgres://u@db.example:6432/app"
    assert describe("host=::1 dbname=x") == "postgres://[::1]/x"
    assert describe("dbname=x") == "postgres:///x"
    assert describe("not a dsn") == "(unparseable DSN)"


def test_children_see_libpq_and_locale_variables_only() -> None:
    env = {"PATH": "/usr/bin", "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC",
           "PGPASSFILE": "/etc/pgpass", "PGSERVICEFILE": "/etc/svc", "AWS_ACCESS_KEY_ID": "a",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "DRDAEMON_CONFIG": "/c",
           "SSH_AUTH_SOCK": "/tmp/agent", "LD_PRELOAD": "/evil.so"}
    assert child_env(env) == {k: env[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ",
                                                   "PGPASSFILE", "PGSERVICEFILE")}


def test_lock_failures_are_read_from_pg_dump_and_server_messages() -> None:
    dumped = ("pg_dump: error: query failed: ERROR:  canceling statement due to statement "
              "timeout\npg_dump: detail: Query was: LOCK TABLE public.\"Big Table\" IN ACCESS "
              "SHARE MODE")
    assert locked_table(dumped) == 'public."Big Table"'
    assert is_lock_timeout(dumped)
    assert is_lock_timeout("canceling statement due to lock timeout")
    assert not is_lock_timeout("canceling statement due to statement timeout")
    assert not is_lock_timeout("pg_dump: error: connection to server failed")


@pytest.mark.parametrize(("text", "says"), [
    ('pg_restore: error: could not execute query: ERROR:  role "lmsapp" does not exist',
     'no role "lmsapp"'),
    ("on postgres://u@h:5432/postgres: permission denied to create database", "lacks CREATEDB"),
    ('database "appdb" is being accessed by other users', 'database "appdb" is in use'),
    ("ERROR:  must be owner of table users", "lacks a privilege"),
    ("pg_restore: error: out of memory", ""),
])
def test_target_hints(text: str, says: str) -> None:
    hint = target_hint(text)
    assert (says in hint) if says else hint == ""


def test_a_failed_connection_names_the_server_libpq_resolved(
        tmp_path: Path, pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    socket_dir = str(Path(pg_server.data_dir).parent)  # type: ignore[arg-type]
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[lms]\nhost={socket_dir}\nport={pg_server.port}\n"
                        f"user={pg_server.user}\ndbname=no_such_db\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    with pytest.raises(SourceError) as failed:
        connect("service=lms")
    assert str(failed.value).startswith(
        f"cannot connect to postgres://{pg_server.user}@/no_such_db?host={socket_dir}"
        f"&port={pg_server.port} (service lms): ")
    assert 'database "no_such_db" does not exist' in str(failed.value)
    with pytest.raises(SourceError) as failed:
        connect(f"host={socket_dir} port={pg_server.port} dbname=nope user={pg_server.user}")
    assert f"postgres://{pg_server.user}@/nope?host={socket_dir}&port={pg_server.port}:" \
        in str(failed.value)
