"""``localvl keys create|list|revoke``: API keys in the SQL store the server reads."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

_LIMIT_FLAGS = (("rpm", "requests per minute"), ("itpm", "input tokens per minute"),
                ("otpm", "output tokens per minute"), ("max_streams", "requests running at once"))


def add_parser(sub: Any) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys kept in the store",
                       description="Keys live in the same store the server uses: give the same --data-dir, "
                       "--database-url or --config as `localvl serve` (or the same LOCALVL_* variables).")
    actions = p.add_subparsers(dest="action", required=True)

    def store_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", type=Path, help="TOML settings file, as for serve")
        q.add_argument("--data-dir", dest="data_dir", type=Path, help="as for serve (default ~/.local/share/localvl)")
        q.add_argument("--database-url", dest="database_url", help="as for serve")

    create = actions.add_parser("create", help="create a key and print it (shown this once only)")
    create.add_argument("--name", required=True, help="what logs and `keys list` call it")
    for name, meaning in _LIMIT_FLAGS:
        create.add_argument("--" + name.replace("_", "-"), dest=name, type=int, help=f"{meaning} (default: serve's)")
    store_flags(create)
    listing = actions.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--all", action="store_true", help="revoked keys too")
    store_flags(listing)
    revoke = actions.add_parser("revoke", help="revoke a key by id, or every active key with a name")
    revoke.add_argument("key", help="key id (key_…) or name")
    store_flags(revoke)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from localvl.settings import Settings, describe_invalid

    flags = {k: getattr(args, k) for k in ("config", "data_dir", "database_url") if getattr(args, k) is not None}
    try:
        settings = Settings(**flags)
    except (ValidationError, ValueError) as error:
        print(f"localvl keys: invalid settings:\n{describe_invalid(error)}", file=sys.stderr)
        return 2
    if args.action == "create":
        for name, _ in _LIMIT_FLAGS:
            value = getattr(args, name)
            if value is not None and value < 1:
                print(f"localvl keys: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
                return 2
        if not args.name.strip() or len(args.name) > 255:
            print("localvl keys: --name must be 1 to 255 characters", file=sys.stderr)
            return 2
    return asyncio.run(_run(args, settings))


async def _run(args: argparse.Namespace, settings: Any) -> int:
    from localvl.security.keys import Limits
    from localvl.store.lazy import LazyStore

    store = LazyStore(settings)
    try:
        keys = await store.keys()
        if args.action == "create":
            limits = Limits(args.rpm, args.itpm, args.otpm, args.max_streams)
            record, key = await keys.create(args.name.strip(), limits)
            print(f"created {record.id} ({record.name}); the key is shown this once only:", file=sys.stderr)
            print(key)
            return 0
        if args.action == "list":
            records = await keys.list(include_revoked=args.all)
            print(f"{'id':<28} {'name':<20} {'key':<18} {'rpm':>7} {'itpm':>9} {'otpm':>9} {'streams':>7}  created")
            for r in records:
                cells = [("-" if v is None else str(v)) for v in (r.limits.rpm, r.limits.itpm, r.limits.otpm, r.limits.max_streams)]
                revoked = f"  revoked {r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else ""
                print(f"{r.id:<28} {r.name:<20} {r.hint:<18} {cells[0]:>7} {cells[1]:>9} {cells[2]:>9} {cells[3]:>7}  "
                      f"{r.created_at:%Y-%m-%d %H:%M}{revoked}")
            return 0
        revoked = await keys.revoke(args.key)
        if not revoked:
            print(f"localvl keys: no active key with id or name {args.key!r}", file=sys.stderr)
            return 1
        for r in revoked:
            print(f"revoked {r.id} ({r.name}); servers stop accepting it within seconds")
        return 0
    finally:
        await store.stop()
