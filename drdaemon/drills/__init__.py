"""Restore drills, one room: running them, their records, their scratch space, the report.

- `run`: the drill service (choose the snapshot, run the attempt, measure, record);
- `attempt`: one drill's restore into a scratch copy the source's kind makes, and its
  verification (sources.base.SourceKind.open_scratch), timed by `timing`;
- `records`: the drill records in the state folder (`drills.jsonl`);
- `scratch`: scratch names that carry their owner, and removal of what killed drills left;
- `attest`: which records the audit log attests, for a report;
- `report`: the auditor's report (HTML from `templates/report.html.j2`, Markdown, JSON).
"""
