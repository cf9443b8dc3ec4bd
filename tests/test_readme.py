"""The README's two set-up commands are the ones users and CI run."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def marked_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```sh\n(.+)\n```", text)
    assert match, f"README.md has no command after <!-- {marker} -->"
    return match.group(1)


def test_readme_has_the_serve_and_the_test_command():
    serve, test = marked_command("serve-command"), marked_command("test-command")
    assert serve.endswith("localvl serve")
    assert "pytest" in test and "[test]" in test


def test_ci_runs_the_readme_test_command():
    extracted = subprocess.run(
        ["awk", "/<!-- test-command -->/ { getline; getline; print; exit }", "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == marked_command("test-command")
    assert "awk '/<!-- test-command -->/" in (ROOT / ".ci" / "run").read_text()
