"""Smoke tests for the fixtures in conftest.py (real PostgreSQL, real moto S3 servers)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import botocore.config
import botocore.exceptions
import psycopg
import pytest
from conftest import PgServer, S3Region

FAST_FAIL = botocore.config.Config(
    retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=5
)


def test_clean_env() -> None:
    assert not [k for k in os.environ if k.startswith("DRDAEMON_")]
    for name in ("AWS_PROFILE", "PGPASSWORD", "PGSERVICE", "PGHOST", "PGPORT", "PGUSER",
                 "PGDATABASE"):
        assert name not in os.environ
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    home = Path(os.environ["HOME"])
    assert home.is_dir() and not any(home.iterdir())


def test_free_port(free_port: Callable[[], int]) -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_pg_server_version(pg_server: PgServer) -> None:
    assert pg_server.host == "127.0.0.1"
    assert pg_server.dsn("x") == f"host=127.0.0.1 port={pg_server.port} user=postgres dbname=x"
    with psycopg.connect(pg_server.dsn()) as conn:
        row = conn.execute("select version()").fetchone()
        assert row is not None and row[0].startswith("PostgreSQL ")
        major = conn.execute("show server_version_num").fetchone()
        assert major is not None and int(major[0]) // 10000 == int(pg_server.bin_dir.parent.name)
        assert conn.execute("show fsync").fetchone() == ("off",)
    assert pg_server.bin("pg_dump").is_file()


def test_pg_database_is_fresh_and_dropped(pg_server: PgServer, pg_database: str) -> None:
    with psycopg.connect(pg_database) as conn:
        dbname = conn.execute("select current_database()").fetchone()
        assert dbname is not None and dbname[0].startswith("test_")
        tables = conn.execute(
            "select count(*) from information_schema.tables where table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("create table t (id int primary key, v text)")
        conn.execute("insert into t values (1, 'a')")


def test_s3_regions_put_get(s3_regions: list[S3Region]) -> None:
    eu, us = s3_regions
    assert (eu.region, eu.continent) == ("eu-central-1", "europe")
    assert (us.region, us.continent) == ("us-east-1", "north-america")
    assert eu.endpoint_url != us.endpoint_url
    for r in s3_regions:
        c = r.client()
        c.put_object(Bucket=r.bucket, Key="hello.txt", Body=f"hi from {r.name}".encode())
        body = c.get_object(Bucket=r.bucket, Key="hello.txt")["Body"].read()
        assert body == f"hi from {r.name}".encode()
    loc = eu.client().get_bucket_location(Bucket=eu.bucket)["LocationConstraint"]
    assert loc == "eu-central-1"


def test_s3_regions_are_independent(s3_regions: list[S3Region]) -> None:
    """Each region is its own server: its buckets are invisible from the other endpoint."""
    eu, us = s3_regions
    eu_names = {b["Name"] for b in eu.client().list_buckets()["Buckets"]}
    us_names = {b["Name"] for b in us.client().list_buckets()["Buckets"]}
    assert eu_names == {eu.bucket}
    assert us_names == {us.bucket}
    with pytest.raises(botocore.exceptions.ClientError):
        us.client().head_bucket(Bucket=eu.bucket)


@pytest.mark.parametrize("round_", [1, 2])
def test_s3_regions_fresh_per_test(s3_regions: list[S3Region], round_: int) -> None:
    """No objects leak from one test to the next."""
    for r in s3_regions:
        c = r.client()
        assert c.list_objects_v2(Bucket=r.bucket).get("KeyCount") == 0
        c.put_object(Bucket=r.bucket, Key=f"leftover-{round_}", Body=b"x")


def test_losing_a_region(moto_region_factory: Callable[..., S3Region]) -> None:
    """Stopping one (private) region refuses connections; the other keeps working; restart
    brings the first back on the same port with its data."""
    lost = moto_region_factory("lost", "eu-central-1", "europe")
    alive = moto_region_factory("alive", "us-east-1", "north-america")
    for r in (lost, alive):
        r.client().put_object(Bucket=r.bucket, Key="k", Body=b"v")

    lost.server.stop()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        lost.client(config=FAST_FAIL).get_object(Bucket=lost.bucket, Key="k")
    with pytest.raises(ConnectionRefusedError), socket.create_connection(
        lost.server.get_host_and_port(), timeout=2
    ):
        pass
    assert alive.client().get_object(Bucket=alive.bucket, Key="k")["Body"].read() == b"v"

    lost.server.start()
    assert lost.client().get_object(Bucket=lost.bucket, Key="k")["Body"].read() == b"v"
