"""The README's job table and in-page links against the code: a renamed field, a changed default or a
renamed heading otherwise goes unnoticed until a user trips on it."""

import re
from pathlib import Path

from kantai_batch.job import Job

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
# A job-table row: | `section.field` | default | meaning |
ROW = re.compile(r"^\| `((?:[a-z_]+\.)?[a-z_0-9]+)` \| ([^|]*) \|", re.MULTILINE)
UNSET = {"unset": None, "null": None, "true": True, "false": False}


def _job_rows() -> dict[str, str]:
    table = README[README.index("## The job file") : README.index("## Corpus sources and formats")]
    return {key: default.strip() for key, default in ROW.findall(table)}


def _fields(model, prefix: str = "") -> dict[str, object]:
    out = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if hasattr(type(value), "model_fields"):
            out.update(_fields(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def test_job_table_names_every_field_with_its_default():
    rows, fields = _job_rows(), _fields(Job())
    assert sorted(rows) == sorted(fields)
    for key, shown in rows.items():
        value = fields[key]
        if isinstance(value, (bool, int, float)) or value is None:
            # Numbers and flags as the table spells them; prose defaults (a URL, a sentence) are not compared.
            expected = UNSET[shown] if shown in UNSET else float(shown.replace(",", ""))
            assert value == expected, key


def test_in_page_links_name_headings():
    headings = set()
    for line in re.sub(r"```.*?```", "", README, flags=re.DOTALL).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            headings.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    links = set(re.findall(r"\]\(#([^)]+)\)", README))
    assert links and links <= headings, links - headings
