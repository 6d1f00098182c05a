"""The pure core of database-level properties: ACL items, list settings, the statements a
restore runs and the comparison a drill makes (real-server tests: test_postgres_properties)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyrage import x25519

from drdaemon.errors import UsageError
from drdaemon.sources.pg_database import (
    AclItem,
    Properties,
    apply_steps,
    create_statement,
    differences,
    format_aclitem,
    missing_roles,
    parse_aclitem,
    seal,
    seal_facts,
    split_guc_list,
    unseal,
)

names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=12)
privileges = st.lists(st.sampled_from(["C", "T", "c", "C*", "T*", "c*"]), min_size=0,
                      max_size=3, unique_by=lambda p: p[0]).map("".join)

BASE = Properties(
    name="lms", encoding="LATIN1", collate="C", ctype="C", locale_provider="libc",
    icu_locale=None, owner="lmsapp", connection_limit=-1,
    settings=('search_path=app, "$user", public',), role_settings=(("reader", "work_mem=8MB"),),
    comment="Kurse", acl=(AclItem("lmsapp", "CTc", "lmsapp"), AclItem("reader", "c", "lmsapp")))


@given(st.one_of(st.just(""), names), privileges, names)
def test_aclitem_text_round_trips(grantee: str, privs: str, grantor: str) -> None:
    item = AclItem(grantee, privs, grantor)
    assert parse_aclitem(format_aclitem(item)) == item


def test_aclitem_examples() -> None:
    assert parse_aclitem("=Tc/postgres") == AclItem("", "Tc", "postgres")
    assert parse_aclitem('"Big ""Boss"""=C*c/x') == AclItem('Big "Boss"', "C*c", "x")
    assert AclItem("a", "C*Tc", "b").grants() == (["TEMPORARY", "CONNECT"], ["CREATE"])
    for bad in ("nobody", "a=c", '"a=c/b', "a=X/b", "a=c/"):
        with pytest.raises(ValueError):
            parse_aclitem(bad)


def _quote(elem: str) -> str:
    simple = elem and all(c.isascii() and (c.islower() or c.isdigit() or c == "_") for c in elem)
    return elem if simple else '"' + elem.replace('"', '""') + '"'


@given(st.lists(names, min_size=1, max_size=5))
def test_list_settings_split_as_postgres_writes_them(elems: list[str]) -> None:
    assert split_guc_list(", ".join(_quote(e) for e in elems)) == elems


def test_statements_a_restore_runs() -> None:
    create = create_statement(dataclasses.replace(BASE, locale_provider="icu",
                                                  icu_locale="de-CH"), "stage", 150000)
    assert create.as_string(None) == (
        "CREATE DATABASE \"stage\" TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' "
        "LC_CTYPE 'C' LOCALE_PROVIDER icu ICU_LOCALE 'de-CH'")
    assert create_statement(None, "stage", 150000).as_string(None) == \
        'CREATE DATABASE "stage" TEMPLATE template0'
    with pytest.raises(UsageError, match="PostgreSQL 15"):
        create_statement(dataclasses.replace(BASE, locale_provider="icu"), "s", 140000)
    text = [s.as_string(None) for step in apply_steps(BASE, "stage") for s in step.statements]
    assert text == [
        'REVOKE ALL ON DATABASE "stage" FROM PUBLIC',
        'REVOKE ALL ON DATABASE "stage" FROM "lmsapp"',
        'GRANT CREATE, TEMPORARY, CONNECT ON DATABASE "stage" TO "lmsapp"',
        'GRANT CONNECT ON DATABASE "stage" TO "reader"',
        'ALTER DATABASE "stage" SET "search_path" TO \'app\', \'$user\', \'public\'',
        'ALTER ROLE "reader" IN DATABASE "stage" SET "work_mem" TO \'8MB\'',
        'COMMENT ON DATABASE "stage" IS \'Kurse\'',
    ]
    # Without the recorded owner, the restoring role takes the owner's privileges.
    unowned = [s.as_string(None) for step in apply_steps(BASE, "stage", owned=False)
               for s in step.statements]
    assert 'GRANT CREATE, TEMPORARY, CONNECT ON DATABASE "stage" TO CURRENT_USER' in unowned
    # The default ACL (NULL) is left as it is.
    default = dataclasses.replace(BASE, acl=None)
    assert not any("GRANT" in s.as_string(None) or "REVOKE" in s.as_string(None)
                   for step in apply_steps(default, "stage") for s in step.statements)


acl_items = st.builds(AclItem, st.one_of(st.just(""), names), privileges, names)
settings = st.builds(lambda n, v: f"{n}={v}", st.from_regex(r"[a-z_.]{1,12}", fullmatch=True),
                     st.text(max_size=12))
properties = st.builds(
    Properties, name=names, encoding=st.sampled_from(["UTF8", "LATIN1", "SQL_ASCII"]),
    collate=names, ctype=names, locale_provider=st.sampled_from(["libc", "icu"]),
    icu_locale=st.none() | names, owner=names, connection_limit=st.integers(-1, 1000),
    settings=st.lists(settings, max_size=3).map(tuple),
    role_settings=st.lists(st.tuples(names, settings), max_size=2).map(tuple),
    comment=st.none() | st.text(max_size=20), acl=st.none() | st.lists(acl_items).map(tuple))


@given(properties)
def test_any_record_survives_the_manifest_and_equals_itself(p: Properties) -> None:
    assert Properties.from_facts(p.to_facts()) == p
    assert differences(p, p) == []
    assert set(missing_roles(p, [])) == set(p.roles()) and missing_roles(p, p.roles()) == {}


def test_facts_round_trip_and_old_manifests() -> None:
    assert Properties.from_facts(BASE.to_facts()) == BASE
    assert Properties.from_facts(dataclasses.replace(BASE, acl=None).to_facts()) == \
        dataclasses.replace(BASE, acl=None)
    assert Properties.from_facts("lms") is None  # an older drdaemon recorded the name only
    assert Properties.from_facts(None) is None
    for broken in ({**BASE.to_facts(), "owner": 3}, {"name": "x"},
                   {**BASE.to_facts(), "settings": ["nameonly"]},
                   {**BASE.to_facts(), "locale_provider": "magic"}):
        with pytest.raises(ValueError):
            Properties.from_facts(broken)


def test_differences_name_each_property() -> None:
    assert differences(BASE, dataclasses.replace(BASE, name="other")) == []
    got = dataclasses.replace(BASE, collate="C.UTF-8", comment=None, settings=(),
                              acl=(AclItem("lmsapp", "CTc", "lmsapp"),))
    assert differences(BASE, got) == [
        "privileges of reader granted by <owner> is missing, the manifest says 'c'",
        "collate is 'C.UTF-8', the manifest says 'C'",
        "comment is none, the manifest says 'Kurse'",
        "setting search_path is missing, the manifest says 'app, \"$user\", public'",
    ]
    # A drill server without the roles: skipped keys (and all they prefix) are not compared.
    assert differences(BASE, got, [("collate",), ("comment",), ("acl", "reader"),
                                   ("setting",)]) == []


def test_owner_is_compared_by_role_and_the_default_acl_spelled_out() -> None:
    # Another owner, the same privileges relative to it: only the owner differs.
    moved = dataclasses.replace(BASE, owner="drill", acl=(AclItem("drill", "CTc", "drill"),
                                                          AclItem("reader", "c", "drill")))
    assert differences(BASE, moved) == ["owner is 'drill', the manifest says 'lmsapp'"]
    assert differences(BASE, moved, [("owner",)]) == []
    default = dataclasses.replace(BASE, acl=None)
    explicit = dataclasses.replace(BASE, acl=(AclItem("", "Tc", "lmsapp"),
                                              AclItem("lmsapp", "CTc", "lmsapp")))
    assert differences(default, explicit) == []


def test_missing_roles_say_what_names_them() -> None:
    assert missing_roles(BASE, ["lmsapp", "reader"]) == {}
    assert missing_roles(BASE, ["postgres"]) == {
        "lmsapp": ["grantor", "owner", "privileges"], "reader": ["privileges", "settings"]}


def test_settings_are_sealed_to_the_recipients() -> None:
    ident, other = x25519.Identity.generate(), x25519.Identity.generate()
    sealed = seal(BASE.to_facts(), [ident.to_public()])
    assert "8MB" not in json.dumps(sealed) and "$user" not in json.dumps(sealed)
    assert sealed["setting_names"] == ["search_path"]
    assert sealed["role_setting_names"] == [["reader", "work_mem"]]
    assert Properties.from_facts(unseal(sealed, [ident])) == BASE
    with pytest.raises(UsageError, match="no identity given can decrypt"):
        unseal(sealed, [other])
    with pytest.raises(ValueError):
        unseal({**sealed, "sealed_settings": "not base64!"}, [ident])
    assert seal_facts({"database": "old"}, [ident.to_public()]) == {"database": "old"}
    assert unseal("old", [ident]) == "old"
