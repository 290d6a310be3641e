"""A fleet's shape from the targets file: its groups, and each group's canaries.

A canary is a non-production target whose passed deployment lets production targets take the same phase
files. Each group names its own in the targets file, or inherits the fleet's::

    [fleet]
    canaries = ["staging"]          # the fleet's canaries (default: its non-production targets in no group)

    [groups.eu]
    canaries = ["staging-eu"]       # eu's canaries (default: eu's own non-production targets, else the fleet's)

    [targets.staging-eu]
    ...
    group = "eu"

A production target waits for the canaries of its group only (one in no group: the fleet's), so a broken
staging target holds back its own group, not the fleet. A fleet given one group (`Fleet(group="eu")`)
also deploys that group's canaries, even those outside it (a shared staging). No Dagster here: the sensor
and the partitions of runbooks/fleet.py ask this module.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from . import connection

FLEET_TABLE, GROUPS_TABLE, CANARIES_KEY = "fleet", "groups", "canaries"


class UnknownGroup(connection.TargetError):
    """The fleet is given a group that no target of the targets file has."""


@dataclass(frozen=True)
class FleetPlan:
    """Every target of one targets file, and the canaries each group waits for."""

    path: Path
    targets: tuple[connection.Target, ...]
    fleet_canaries: tuple[str, ...]        # of production targets in no group, and of groups naming none
    group_canaries: dict                   # group name -> the canaries it names in [groups.NAME]

    def canaries_of(self, group: str | None) -> tuple[str, ...]:
        """A group's canaries: those it names, else its own non-production targets, else the fleet's."""
        if group is None:
            return self.fleet_canaries
        if group in self.group_canaries:
            return self.group_canaries[group]
        own = tuple(t.name for t in self.targets if t.group == group and not t.production)
        return own or self.fleet_canaries

    def groups(self) -> list[str]:
        return sorted({t.group for t in self.targets if t.group is not None})

    def chosen(self, group: str | None) -> list[connection.Target]:
        """The targets a fleet of `group` deploys (all without one): the group's, and its canaries."""
        if group is None:
            return list(self.targets)
        if group not in self.groups():
            raise UnknownGroup(f"no target of {self.path} is in group {group!r} "
                               f"(its groups: {', '.join(self.groups()) or 'none'})")
        wanted = {t.name for t in self.targets if t.group == group} | set(self.canaries_of(group))
        return [t for t in self.targets if t.name in wanted]

    def by_name(self, name: str) -> connection.Target:
        return next(t for t in self.targets if t.name == name)


def read_plan(targets_file: str | Path | None) -> FleetPlan:
    """The targets file's targets, groups and canaries; a canary that is not a non-production target
    of the file is refused (TargetError), naming it."""
    path = connection.targets_file_path(targets_file)
    targets = tuple(connection.from_targets_file(name, path) for name in connection.target_names(path))
    data = tomllib.loads(path.read_text())
    ungrouped = tuple(t.name for t in targets if t.group is None and not t.production)
    fleet = _canaries(data.get(FLEET_TABLE) or {}, f"[{FLEET_TABLE}]", targets, path)
    groups = {}
    for name, table in (data.get(GROUPS_TABLE) or {}).items():
        found = _canaries(table, f"[{GROUPS_TABLE}.{name}]", targets, path)
        if found is not None:
            groups[name] = found
    return FleetPlan(path=path, targets=targets, fleet_canaries=ungrouped if fleet is None else fleet,
                     group_canaries=groups)


def _canaries(table, where: str, targets, path: Path) -> tuple[str, ...] | None:
    """The `canaries` list of a [fleet] or [groups.NAME] table (None where it names none)."""
    if not isinstance(table, dict):
        raise connection.TargetError(f"{path}: {where} must be a table")
    unknown = sorted(set(table) - {CANARIES_KEY})
    if unknown:
        raise connection.TargetError(f"{path}: {where} has unknown keys {', '.join(unknown)} (allowed: {CANARIES_KEY})")
    if CANARIES_KEY not in table:
        return None
    names = table[CANARIES_KEY]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise connection.TargetError(f'{path}: {where} canaries must be a list of target names (canaries = ["staging"])')
    kinds = {t.name: t.production for t in targets}
    for name in names:
        if name not in kinds:
            raise connection.TargetError(f"{path}: {where} names canary {name!r}, which is not a target of the file")
        if kinds[name]:
            raise connection.TargetError(f"{path}: {where} names canary {name!r}, a production target: a canary "
                                         "is a non-production target that proves the files first")
    return tuple(names)
