"""docs/CONFIGURATION.md is the generator's output: a setting added without regenerating fails here."""

from __future__ import annotations

from pathlib import Path

from localvl.settings import Settings
from localvl.settings_reference import render

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIGURATION.md"
REGENERATE = "python -m localvl.settings_reference > docs/CONFIGURATION.md"


def test_configuration_md_is_up_to_date():
    assert DOC.read_text() == render(), f"docs/CONFIGURATION.md is out of date: run `{REGENERATE}`"


def test_every_setting_has_a_row_with_its_env_var_and_a_description():
    rows = {line.split("|")[1].strip(" `"): line for line in render().splitlines() if line.startswith("| `")}
    assert set(rows) == set(Settings.model_fields)
    for name, row in rows.items():
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert cells[2] == f"`LOCALVL_{name.upper()}`"
        assert cells[4], f"{name} has no description (give its Field a description)"
    assert "`--no-cuda-graphs`" in rows["cuda_graphs"] and "(32 MiB)" in rows["max_request_bytes"]
    assert "`--api-key`" in rows["api_key"] and "`127.0.0.1`" in rows["host"]
