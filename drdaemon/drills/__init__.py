"""Restore drills, one room: running them, their records, their scratch space, the report.

- `run`: the drill service (choose, restore into scratch, verify, measure, record);
- `records`: the drill records in the state folder (`drills.jsonl`);
- `scratch`: scratch names that carry their owner, and removal of what killed drills left;
- `report`: the auditor's report (HTML from `templates/report.html.j2`, Markdown, JSON).
"""
