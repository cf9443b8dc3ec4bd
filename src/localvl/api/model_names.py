"""Which names clients may use for the served model(s), and how they are listed."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import datetime

from localvl.errors import NotFoundError


@dataclass(frozen=True)
class ServedModel:
    name: str
    created_at: datetime
    context_length: int


@dataclass(frozen=True)
class Alias:
    pattern: str
    target: str

    @property
    def is_glob(self) -> bool:
        return any(c in self.pattern for c in "*?[")


def parse_aliases(values: list[str], default_target: str) -> list[Alias]:
    """``PATTERN=NAME`` maps request names matching the glob to NAME; bare ``PATTERN`` to the default model."""
    aliases = []
    for value in values:
        pattern, sep, target = value.partition("=")
        pattern, target = pattern.strip(), target.strip()
        if not pattern or (sep and not target):
            raise ValueError(f"alias {value!r} is not PATTERN or PATTERN=NAME")
        aliases.append(Alias(pattern, target or default_target))
    return aliases


class ModelNames:
    def __init__(self, models: list[ServedModel], aliases: list[Alias], unlisted: dict[str, str] | None = None) -> None:
        """``unlisted``: names taken exactly (no glob) but not listed, each for a served model."""
        self.models = {m.name: m for m in models}
        for alias in aliases:
            if alias.target not in self.models:
                raise ValueError(f"alias {alias.pattern!r} points at {alias.target!r}, which is not served")
        self.aliases = aliases
        self.unlisted = {name: self.models[target] for name, target in (unlisted or {}).items()}

    @property
    def default(self) -> ServedModel:
        """The first served model: what a request that names none gets."""
        return next(iter(self.models.values()))

    def resolve(self, requested: str) -> ServedModel | None:
        if requested in self.models:
            return self.models[requested]
        if requested in self.unlisted:
            return self.unlisted[requested]
        for alias in self.aliases:
            if fnmatch.fnmatchcase(requested, alias.pattern):
                return self.models[alias.target]
        return None

    def require(self, requested: str) -> ServedModel:
        """The model a request names, or a 404 ``not_found_error`` naming it."""
        served = self.resolve(requested)
        if served is None:
            raise NotFoundError(f"model: {requested}")
        return served

    def listed(self) -> list[tuple[str, ServedModel]]:
        """Served names, then literal (non-glob) aliases, as (id, model)."""
        entries = dict(self.models)
        for alias in self.aliases:
            if not alias.is_glob:
                entries.setdefault(alias.pattern, self.models[alias.target])
        return list(entries.items())
