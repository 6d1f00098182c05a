"""What each role lacks, judged from the facts a server gives (pure; the live check is in
test_postgres_properties)."""

from __future__ import annotations

import dataclasses

from drdaemon.sources.pg_roles import (
    Role,
    SourceFacts,
    judge_backup,
    judge_drill,
    judge_restore,
)

PLAIN = Role("bk", superuser=False, bypassrls=False, createdb=False)
FACTS = SourceFacts(PLAIN, owner="lmsapp", owner_member=False,
                    unreadable=("public.a", "public.b", "public.c", "public.d"),
                    rls_tables=("public.marks",), unreadable_large_objects=2,
                    foreign_owners=("lmsapp",))


def test_a_plain_role_lacks_everything_a_job_needs() -> None:
    assert judge_backup(FACTS) == [
        "SELECT on 4 table(s) or sequence(s) (public.a, public.b, public.c and 1 more): "
        "grant pg_read_all_data",
        "BYPASSRLS: 1 table(s) have row-level security (public.marks); pg_dump refuses to "
        "dump them partially",
        "SELECT on 2 large object(s) (pg_read_all_data does not cover them): "
        "GRANT SELECT ON LARGE OBJECT"]
    assert [m.split(":")[0] for m in judge_restore(FACTS)] == [
        "CREATEDB", "membership in lmsapp (the database's owner)", "membership in lmsapp"]
    assert [m.split(":")[0] for m in judge_drill(PLAIN, FACTS)] == ["CREATEDB", "BYPASSRLS"]


def test_superusers_and_sufficient_roles_lack_nothing() -> None:
    su = dataclasses.replace(PLAIN, superuser=True)
    assert judge_backup(dataclasses.replace(FACTS, role=su)) == []
    assert judge_restore(dataclasses.replace(FACTS, role=su)) == []
    assert judge_drill(su, FACTS) == []
    enough = dataclasses.replace(PLAIN, bypassrls=True, createdb=True)
    facts = dataclasses.replace(FACTS, role=enough, owner_member=True, unreadable=(),
                                unreadable_large_objects=0, foreign_owners=())
    assert judge_backup(facts) == [] and judge_restore(facts) == []
    assert judge_drill(enough, facts) == []
    # Without row-level security, the drill role needs no BYPASSRLS.
    assert judge_drill(dataclasses.replace(PLAIN, createdb=True),
                       dataclasses.replace(FACTS, rls_tables=())) == []
