"""SKILL.md, docs/dispatchers.md and the card cannot drift apart.

The tables in SKILL.md are parsed back out of the markdown (independently of the code that
wrote them) and compared with the card row by row; the front matter must match the card.
"""

from __future__ import annotations

import re

import yaml

from megatron_moe_probe.selection.card import CARD_PATH, DOCS_PATH, SKILL_MD_PATH, load_card, write_skill_tables

CARD = load_card()


def front_matter(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, "SKILL.md must start with YAML front matter"
    return yaml.safe_load(m.group(1))


def section(text: str, name: str) -> str:
    m = re.search(rf"<!-- card:{name} -->\n(.*?)\n<!-- /card:{name} -->", text, re.S)
    assert m, f"section {name} missing"
    return m.group(1)


def table_rows(md: str) -> list[list[str]]:
    rows = [l for l in md.splitlines() if l.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]  # skip header and rule


SKILL = SKILL_MD_PATH.read_text()


def source_cell(cell: str, row) -> bool:
    """Every row carries source and date; public rows also name the pull request / file (ref)."""
    expected = f"{row.source}, {row.date}"
    if row.source == "public":
        return cell == f"{expected}, {row.ref}" and bool(row.ref)
    return cell == expected


def test_front_matter_matches_card():
    fm = front_matter(SKILL)
    assert set(fm) >= {"name", "description", "when_to_use"}
    assert fm["name"] == CARD.name == SKILL_MD_PATH.parent.name
    assert fm["description"] == CARD.description
    assert fm["when_to_use"] == CARD.when_to_use


def test_hardware_table_matches_card():
    rows = table_rows(section(SKILL, "by_hardware"))
    assert [r[0] for r in rows] == [r.row for r in CARD.tables.by_hardware]
    for cells, row in zip(rows, CARD.tables.by_hardware):
        assert cells[1].strip("`") == row.bring_up
        assert cells[2].endswith(row.text) and cells[3] == row.why
        for c in row.tuned:  # the candidate set is named
            assert CARD.backend(c.backend).label.lower() in cells[2].lower()
        assert source_cell(cells[4], row)  # every row carries source and date
        for h in row.history:  # and the earlier answer is kept
            assert h.text in cells[5] and h.date in cells[5]


def test_ep_and_model_tables_match_card():
    rows = table_rows(section(SKILL, "by_ep"))
    assert [(r[0], r[1]) for r in rows] == [(r.row, r.text) for r in CARD.tables.by_ep]
    rows = table_rows(section(SKILL, "by_model"))
    assert [(r[0], r[1], r[2]) for r in rows] == [(r.row, r.text, r.notes) for r in CARD.tables.by_model]
    for cells, row in zip(rows, CARD.tables.by_model):
        assert source_cell(cells[3], row)


def test_interconnect_table_matches_card():
    rows = table_rows(section(SKILL, "by_interconnect"))
    assert [(r[0], r[1]) for r in rows] == [(r.row, r.text) for r in CARD.tables.by_interconnect]
    assert len(rows) >= 4  # NVL72, EFA micro-batch 1, EFA micro-batch 4, EFA on H100, Spectrum-X
    for cells, row in zip(rows, CARD.tables.by_interconnect):
        assert source_cell(cells[2], row)


def test_new_dispatchers_and_correctness_checks_listed():
    rows = table_rows(section(SKILL, "new_dispatchers"))
    assert [r[0] for r in rows] == [d.label for d in CARD.new_dispatchers]
    for cells, d in zip(rows, CARD.new_dispatchers):
        assert d.not_in.split()[-1] in cells[1] or "0.19" in cells[1] or d.where == cells[1]
        for lim in d.limits:
            assert lim in cells[3]
        assert (not d.verified) == ("unverified" in cells[3])
        assert source_cell(cells[4], d)
    rows = table_rows(section(SKILL, "correctness"))
    assert [r[1] for r in rows] == [c.check for c in CARD.correctness_checks]
    for cells, c in zip(rows, CARD.correctness_checks):
        assert int(cells[0]) == c.ep_min and source_cell(cells[3], c)


def test_rules_table_is_the_card_order():
    rows = table_rows(section(SKILL, "rules"))
    assert [r[1].strip("`") for r in rows] == [r.id for r in CARD.rules]
    for cells, rule in zip(rows, CARD.rules):
        assert CARD.backend(rule.choose).label.lower() in cells[3].lower() or rule.choose in cells[3]


def test_backend_flags_table_matches_card():
    rows = table_rows(section(SKILL, "backends"))
    assert len(rows) == len(CARD.backends)
    for cells, b in zip(rows, CARD.backends):
        assert cells[1].strip("`") == " ".join(b.megatron_lm_flags)
        for k, v in b.bridge_overrides.items():
            assert f"{k}={v}" in cells[2]
        for req in b.requires:
            assert req.module.split(".")[0] in cells[3]


def test_measured_rows_and_limitations_listed():
    rows = table_rows(section(SKILL, "measured"))
    assert len(rows) == len(CARD.measured)
    for cells, m in zip(rows, CARD.measured):
        assert cells[1] == f"{m.gpus}×{m.hardware}" and source_cell(cells[8], m)
        if m.micro_batch is not None:
            assert f"mb{m.micro_batch}" in cells[6]
        for backend, seconds in m.versus.items():  # the other arm of the A/B is kept
            assert f"{seconds:g} s" in cells[9]
        if m.tflops_per_gpu is not None:
            assert float(cells[4].lstrip("~")) == m.tflops_per_gpu
    text = section(SKILL, "limitations")
    for lim in CARD.known_limitations:
        assert lim.text in text
    tuning = section(SKILL, "tuning")
    assert "`moe-deepep-num-sms` | 20 |" in tuning and "`moe-hybridep-num-sms` | 16 |" in tuning


def test_pitfalls_listed():
    text = section(SKILL, "pitfalls")
    for p in CARD.pitfalls:
        assert p.text in text
        if not p.verified:  # a figure not found in the stored source says so
            assert f"{p.text} ({p.source}, {p.date}, {p.ref}) [unverified: {p.verify_note}]" in text


def test_generated_sections_are_current(tmp_path):
    # Regenerating must be a no-op: a card edit without --write-skill fails here.
    for path in (SKILL_MD_PATH, DOCS_PATH):
        copy = tmp_path / path.name
        copy.write_text(path.read_text())
        changed = write_skill_tables(CARD, copy, require_all=(path == SKILL_MD_PATH))
        assert not changed, f"{path} is out of date: run python -m megatron_moe_probe.selection.card --write-skill"


def test_a_drifted_card_is_detected(tmp_path):
    data = yaml.safe_load(CARD_PATH.read_text())
    data["tables"]["by_hardware"][0]["why"] = "something else"
    bad = tmp_path / "card.yaml"
    bad.write_text(yaml.safe_dump(data))
    drifted = load_card(bad)
    copy = tmp_path / "SKILL.md"
    copy.write_text(SKILL)
    assert write_skill_tables(drifted, copy)  # the generated text would change


def test_docs_have_the_decision_table():
    docs = DOCS_PATH.read_text()
    rows = table_rows(section(docs, "rules"))
    assert [r[1].strip("`") for r in rows] == [r.id for r in CARD.rules]
