"""A database's access control list in aclitem's text form: `grantee=privileges/grantor`
(grantee "" is PUBLIC), parsed and written back with PostgreSQL's own quoting (putid).
Pure; pg_database.py records and compares ACLs with it."""

from __future__ import annotations

from dataclasses import dataclass

# Privilege letters of a database ACL item (aclitem's text form) and their names.
PRIVILEGES = {"C": "CREATE", "c": "CONNECT", "T": "TEMPORARY"}
PUBLIC = ""  # the grantee of an ACL item granted to PUBLIC

@dataclass(frozen=True)
class AclItem:
    """One aclitem of a database: `grantee=privileges/grantor` (grantee "" is PUBLIC)."""

    grantee: str
    privileges: str  # letters of PRIVILEGES, each followed by '*' if grantable
    grantor: str

    def grants(self) -> tuple[list[str], list[str]]:
        """(privilege names granted, privilege names granted WITH GRANT OPTION)."""
        plain: list[str] = []
        grantable: list[str] = []
        for i, letter in enumerate(self.privileges):
            if letter == "*":
                continue
            name = PRIVILEGES.get(letter)
            if name is None:
                raise ValueError(f"unknown database privilege {letter!r}")
            grantable_ = self.privileges[i + 1:i + 2] == "*"
            (grantable if grantable_ else plain).append(name)
        return plain, grantable


def read_name(text: str, i: int, stops: str) -> tuple[str, int]:
    """A role name in aclitem text at `i` (double-quoted as aclitem's putid does)."""
    if text[i:i + 1] != '"':
        j = i
        while j < len(text) and text[j] not in stops:
            j += 1
        return text[i:j], j
    out, j = [], i + 1
    while j < len(text):
        if text[j] == '"':
            if text[j + 1:j + 2] == '"':
                out.append('"')
                j += 2
                continue
            return "".join(out), j + 1
        out.append(text[j])
        j += 1
    raise ValueError(f"unterminated quoted name in ACL item {text!r}")


def parse_aclitem(text: str) -> AclItem:
    """Parse aclitem's text form, e.g. `lmsapp=c/postgres` or `=Tc/"Big Boss"`."""
    grantee, i = read_name(text, 0, "=")
    if text[i:i + 1] != "=":
        raise ValueError(f"malformed ACL item {text!r}")
    slash = text.find("/", i + 1)
    if slash < 0:
        raise ValueError(f"malformed ACL item {text!r}")
    privileges = text[i + 1:slash]
    grantor, end = read_name(text, slash + 1, "")
    if end != len(text) or not grantor:
        raise ValueError(f"malformed ACL item {text!r}")
    item = AclItem(grantee, privileges, grantor)
    item.grants()  # privilege letters are checked
    return item


def _putid(name: str) -> str:
    if name and all(c.isascii() and (c.isalnum() or c == "_") for c in name):
        return name
    return '"' + name.replace('"', '""') + '"'


def format_aclitem(item: AclItem) -> str:
    """aclitem's text form of `item` (inverse of parse_aclitem)."""
    grantee = _putid(item.grantee) if item.grantee else ""
    return f"{grantee}={item.privileges}/{_putid(item.grantor)}"
