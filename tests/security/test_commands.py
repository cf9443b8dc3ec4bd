"""``localvl keys``: create prints the key once, list never shows it, revoke by id or name."""

import asyncio

from localvl.cli import main
from localvl.security.authenticator import Authenticator
from localvl.settings import Settings
from localvl.store.lazy import LazyStore


def keys(capsys, tmp_path, *args):
    code = main(["keys", *args, "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_create_list_revoke(capsys, tmp_path):
    code, out, err = keys(capsys, tmp_path, "create", "--name", "ci", "--rpm", "5", "--max-streams", "2")
    key = out.strip()
    assert code == 0 and key.startswith("sk-localvl-") and "shown this once" in err
    code, listing, _ = keys(capsys, tmp_path, "list")
    assert code == 0 and "ci" in listing and key not in listing and key[15:] not in listing
    row = listing.splitlines()[1].split()
    assert row[1] == "ci" and row[3] == "5" and row[6] == "2"

    async def identify():
        store = LazyStore(Settings(data_dir=tmp_path))
        try:
            return await Authenticator([], store).identify([key])
        finally:
            await store.stop()

    assert asyncio.run(identify()).name == "ci"  # the server finds the key the command made
    code, out, _ = keys(capsys, tmp_path, "revoke", row[0])
    assert code == 0 and row[0] in out
    code, _, err = keys(capsys, tmp_path, "revoke", "ci")
    assert code == 1 and "no active key" in err
    assert keys(capsys, tmp_path, "list")[1].count("\n") == 1  # the header only
    assert "revoked" in keys(capsys, tmp_path, "list", "--all")[1]


def test_bad_limits_and_names_are_refused(capsys, tmp_path):
    assert keys(capsys, tmp_path, "create", "--name", "x", "--rpm", "0")[0] == 2
    assert keys(capsys, tmp_path, "create", "--name", " ")[0] == 2
