"""Support files for rehearsals and tests: the Supabase shim and the legacy fixture."""

from __future__ import annotations

from pathlib import Path

from .paths import LEGACY_FIXTURE_FILE, SHIM_FILE  # noqa: F401  (re-exported)


def has_auth_schema(conn) -> bool:
    with conn.cursor() as cur:
        cur.execute("select exists (select 1 from pg_namespace where nspname = 'auth')")
        (found,) = cur.fetchone()
    conn.rollback()
    return found


def run_script(conn, path: Path) -> None:
    """Run a whole support file in one transaction (it is not a phase: no history)."""
    sql = Path(path).read_text()
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
        conn.commit()
    except Exception:
        conn.rollback()
        raise


def load_shim(conn) -> bool:
    """Apply the Supabase shim unless the database already has an auth schema.

    Returns True when it was applied, False when skipped (a real Supabase project, or a
    database that was shimmed before).
    """
    if has_auth_schema(conn):
        return False
    run_script(conn, SHIM_FILE)
    return True


def load_legacy_fixture(conn) -> None:
    """The audited legacy state, with data (needs the shim, or a real auth schema)."""
    run_script(conn, LEGACY_FIXTURE_FILE)
