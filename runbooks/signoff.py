"""The guide's pre-deployment checklist as sign-off parameters.

A production target needs all of them, ``--yes``, and a run inside its maintenance window;
other targets may give them (they are recorded when given). The window is an ISO 8601
interval in UTC or with an offset: ``2026-11-24T22:00Z/2026-11-25T02:00Z``.
"""

from __future__ import annotations

from datetime import datetime, timezone

SIGNOFF = {
    "approver": "who approved the change",
    "change_ticket": "the change ticket",
    "maintenance_window": "the maintenance window, START/END in ISO 8601",
    "stakeholders_notified": "stakeholders were notified (true)",
    "rollback_plan_confirmed": "the rollback plan was confirmed (true)",
}


class SignoffError(ValueError):
    """A sign-off parameter is malformed."""


def parse_window(text: str) -> tuple[datetime, datetime]:
    try:
        start_text, end_text = str(text).split("/")
        start, end = (datetime.fromisoformat(t.strip().replace("Z", "+00:00")) for t in (start_text, end_text))
    except ValueError:
        raise SignoffError(f"maintenance_window {text!r} is not START/END in ISO 8601 "
                           "(like 2026-11-24T22:00Z/2026-11-25T02:00Z)") from None
    if start.tzinfo is None or end.tzinfo is None:
        raise SignoffError(f"maintenance_window {text!r} needs a time zone (Z or +HH:MM)")
    if end <= start:
        raise SignoffError(f"maintenance_window {text!r} ends before it starts")
    return start, end


def problems(params: dict, *, production: bool, confirmed: bool, now: datetime | None = None) -> list[str]:
    """Why a run must be refused ([] when it may go ahead)."""
    found = []
    window = params.get("maintenance_window")
    if window:
        start, end = parse_window(window)
        now = now or datetime.now(timezone.utc)
        if production and not start <= now <= end:
            found.append(f"now ({now:%Y-%m-%dT%H:%MZ}) is outside the maintenance window {window}")
    if not production:
        return found
    if not confirmed:
        found.append("the target is production: pass --yes to confirm")
    for name, meaning in SIGNOFF.items():
        value = params.get(name)
        if value in (None, "", False):
            found.append(f"production needs -p {name} ({meaning})")
        elif name in ("stakeholders_notified", "rollback_plan_confirmed") and value is not True:
            found.append(f"-p {name} must be true")
    return found
