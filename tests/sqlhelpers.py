"""Helpers for the SQL tests of the three phase files: applying a file by psql or by plain
psycopg2, catalog summaries, acting as the API roles, the seeded data set.

The databases come from conftest.py (make_db, template_db): their "@N" templates have the phases
applied through the apply engine; a test about applying the files by psql or psycopg2 applies them
itself, on a clone.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest
from psycopg2.sql import SQL, Identifier

from runbooks import engine, verification
from runbooks.contract import CORE_TABLES, PHASE3_TABLES
from runbooks.paths import PHASES
from runbooks.verification import savepoint

PHASE_FILES = [path for _, path in PHASES]
NO_TRANSACTION = "-- runbook: no-transaction"


def query_once(conn, sql: str, params=None) -> list[tuple]:
    """Run SQL in autocommit on a connection of its own, then close it: the rows, if any."""
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()

CONTRACT_TABLES = CORE_TABLES + PHASE3_TABLES

# the plaintext keys the fixtures hold (legacy_fixture.sql, legacy_variant.sql)
LEGACY_PLAINTEXT_KEYS = ("ts_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0", "ts_live_0123456789abcdef0123456789abcdef",
                         "ts_test_a1b2c3d4e5f60718293a4b5c6d7e8f90")
VARIANT_PLAINTEXT_KEYS = ("uk_live_5f4e3d2c1b0a99887766554433221100", "hk_9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d")
PLAINTEXT_KEYS = {"legacy": LEGACY_PLAINTEXT_KEYS, "variant": VARIANT_PLAINTEXT_KEYS}


# -- applying files ---------------------------------------------------------------------------

def split_file(path: Path) -> tuple[list[str], str, list[str]]:
    """(head, body, tail): the statements marked `-- runbook: no-transaction` before the body, the
    transactional body as one text, and the marked statements after it: the split the apply engine makes
    (tests/test_sql_phases.py checks the files follow that convention)."""
    head, body, tail = engine.split_phase(engine.parse_file(path))
    return [s.text for s in head], ";\n".join(s.text for s in body) + ";\n", [s.text for s in tail]


def start_phase(conn, path: Path, settings: str = "") -> list[str]:
    """A phase the engine's way up to its commit, on `conn`: `settings` (SET statements), the statements
    before the body each on its own, the body in one transaction; then `conn` in autocommit. The tail."""
    head, body, tail = split_file(path)
    conn.autocommit = True
    with conn.cursor() as cur:
        if settings:
            cur.execute(settings)
        for statement in head:
            cur.execute(statement)
    conn.autocommit = False
    with conn.cursor() as cur:
        cur.execute(body)
    conn.commit()
    conn.autocommit = True
    return tail


def apply_psql(db, path: Path) -> subprocess.CompletedProcess:
    """psql -X -q -v ON_ERROR_STOP=1 -f FILE; a failure shows psql's stderr."""
    try:
        return db.psql_file(path)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"psql -f {Path(path).name} failed on {db.name}:\n{exc.stderr[-4000:]}")


def psql_error(db, path: Path) -> str:
    """Apply a file that is expected to fail; return psql's stderr."""
    with pytest.raises(subprocess.CalledProcessError) as failed:
        db.psql_file(path)
    return failed.value.stderr


def apply_psycopg2(db, path: Path, settings: str = "") -> list[str]:
    """Plain psycopg2: the marked statements before the body each in autocommit, the body in ONE
    transaction (cursor.execute of the text), then each marked statement after it in autocommit, in a session with `settings` (SET statements) run first. Returns the
    server's notices."""
    conn = db.connect()
    try:
        tail = start_phase(conn, path, settings)
        with conn.cursor() as cur:
            for statement in tail:
                cur.execute(statement)
        return list(conn.notices)
    except Exception:
        if not conn.autocommit:
            conn.rollback()
        raise
    finally:
        conn.close()


def apply_phases(db, count: int = 3, start: int = 1, how: str = "psql") -> None:
    for path in PHASE_FILES[start - 1:count]:
        (apply_psql if how == "psql" else apply_psycopg2)(db, path)


# -- queries -------------------------------------------------------------------------------------

def tables_in(db, schemas) -> list[str]:
    """The tables of the given schemas, schema-qualified and quoted."""
    return [t for (t,) in db.query("""
        select format('%%I.%%I', n.nspname, c.relname) from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%s) and c.relkind in ('r', 'p') order by 1""", (list(schemas),))]


def row_counts(db, schemas=("public", "auth")) -> dict[str, int]:
    """Exact row count of every table in the given schemas."""
    tables = tables_in(db, schemas)
    if not tables:
        return {}
    union = " union all ".join(f"select '{t}', count(*) from {t}" for t in tables)
    return dict(db.query(union))


SUMMARY_QUERIES = {
    "functions": """
        select n.nspname, p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
               p.prosecdef, coalesce(array_to_string(p.proconfig, ','), ''), p.provolatile, l.lanname, md5(p.prosrc),
               has_function_privilege('anon', p.oid, 'execute'),
               has_function_privilege('authenticated', p.oid, 'execute'),
               has_function_privilege('service_role', p.oid, 'execute')
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace join pg_language l on l.oid = p.prolang
         where n.nspname in ('public', 'private') order by 1, 2, 3""",
    "policies": """
        select tablename, policyname, permissive, roles::text, cmd, qual, with_check
          from pg_policies where schemaname = 'public' and tablename = any(%(tables)s) order by 1, 2""",
    "rls": """
        select relname, relrowsecurity, relforcerowsecurity from pg_class
         where relnamespace = 'public'::regnamespace and relname = any(%(tables)s) order by 1""",
    "triggers": """
        select tgrelid::regclass::text, tgname, pg_get_triggerdef(oid), tgenabled from pg_trigger
         where not tgisinternal and tgrelid::regclass::text = any(%(tables)s) order by 1, 2""",
    "constraints": """
        select conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid, true) ~ '^CHECK|^FOREIGN|^UNIQUE|^PRIMARY'
          from pg_constraint
         where conrelid::regclass::text = any(%(tables)s) and contype in ('c', 'f', 'u', 'p')
           and conname !~ '_not_null_check$' order by 1, 2""",
    "indexes": """
        select tablename, indexname from pg_indexes
         where schemaname = 'public' and tablename = any(%(tables)s) order by 1, 2""",
    "table_privileges": """
        select c.relname, r.rolname,
               array(select p from unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) as p
                      where has_table_privilege(r.rolname, c.oid, p))
          from pg_class c cross join (values ('anon'), ('authenticated'), ('service_role')) as r (rolname)
         where c.relnamespace = 'public'::regnamespace and c.relname = any(%(tables)s) order by 1, 2""",
}


def catalog_summary(db, parts=tuple(SUMMARY_QUERIES), tables=CONTRACT_TABLES) -> dict[str, list[tuple]]:
    """What the contract fixes, read from the catalog (restricted to the contract's tables)."""
    return {part: db.query(SUMMARY_QUERIES[part], {"tables": list(tables)}) for part in parts}


def contract_columns(db, tables=CONTRACT_TABLES) -> list[tuple]:
    """(table, column, type, default) of the columns a fresh install has, as this database has them."""
    return db.query("""
        select c.relname, a.attname, format_type(a.atttypid, a.atttypmod), pg_get_expr(d.adbin, d.adrelid)
          from pg_class c join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
          left join pg_attrdef d on d.adrelid = c.oid and d.adnum = a.attnum
         where c.relnamespace = 'public'::regnamespace and c.relname = any(%s) order by 1, 2""", (list(tables),))


# -- acting as the API roles -----------------------------------------------------------------------

def act_as(cur, who: str) -> None:
    """Become an API role as PostgREST does, a user of the seeded data set for `who`."""
    verification.act_as(cur, who, users=USERS)


def error_of(cur, sql: str, params=None, who: str | None = None) -> psycopg2.Error | None:
    """Run sql in a rolled-back savepoint (as `who` if given); the error it raised, or None."""
    with savepoint(cur, "err"):
        try:
            if who:
                act_as(cur, who)
            cur.execute(sql, params)
        except psycopg2.Error as exc:
            return exc
    return None


def rule_of(exc: psycopg2.Error | None) -> str | None:
    return None if exc is None else exc.diag.constraint_name


# -- the seeded database (for RLS and function tests) ----------------------------------------------

ORG_A = "2a000000-0000-4000-8000-00000000000a"
ORG_B = "2a000000-0000-4000-8000-00000000000b"
USERS = {
    "owner": "2b000000-0000-4000-8000-000000000001",
    "admin": "2b000000-0000-4000-8000-000000000002",
    "member": "2b000000-0000-4000-8000-000000000003",
    "viewer": "2b000000-0000-4000-8000-000000000004",
    "other_admin": "2b000000-0000-4000-8000-000000000005",
    "other_owner": "2b000000-0000-4000-8000-000000000006",
    "spare": "2b000000-0000-4000-8000-000000000007",
}
PRODUCT_A1 = "2c000000-0000-4000-8000-0000000000a1"
PRODUCT_A2 = "2c000000-0000-4000-8000-0000000000a2"
PRODUCT_B1 = "2c000000-0000-4000-8000-0000000000b1"
INVENTORY_A1 = "2d000000-0000-4000-8000-0000000000a1"
INVENTORY_B1 = "2d000000-0000-4000-8000-0000000000b1"
KEY_A = "2e000000-0000-4000-8000-0000000000a1"
KEY_B = "2e000000-0000-4000-8000-0000000000b1"
HASH_A = "a" * 64
HASH_B = "b" * 64

SEED_SQL = f"""
insert into auth.users (id, aud, role, email, raw_user_meta_data, created_at) values
  ('{USERS['owner']}', 'authenticated', 'authenticated', 'olivia@a.test', '{{"full_name": "Olivia Owner"}}', '2024-01-01'),
  ('{USERS['admin']}', 'authenticated', 'authenticated', 'adam@a.test', '{{"full_name": "Adam Admin"}}', '2024-01-02'),
  ('{USERS['member']}', 'authenticated', 'authenticated', 'mia@a.test', '{{}}', '2024-01-03'),
  ('{USERS['viewer']}', 'authenticated', 'authenticated', 'vic@a.test', '{{}}', '2024-01-04'),
  ('{USERS['other_admin']}', 'authenticated', 'authenticated', 'bea@b.test', '{{}}', '2024-01-05'),
  ('{USERS['other_owner']}', 'authenticated', 'authenticated', 'bo@b.test', '{{}}', '2024-01-06'),
  ('{USERS['spare']}', 'authenticated', 'authenticated', 'sam@spare.test', '{{}}', '2024-01-07');
insert into public.organizations (id, name, slug) values
  ('{ORG_A}', 'Alpha Industries', 'alpha'), ('{ORG_B}', 'Beta Labs', 'beta');
insert into public.organization_members (organization_id, user_id, role, created_at) values
  ('{ORG_A}', '{USERS['owner']}', 'owner', '2024-01-01'), ('{ORG_A}', '{USERS['admin']}', 'admin', '2024-01-02'),
  ('{ORG_A}', '{USERS['member']}', 'member', '2024-01-03'), ('{ORG_A}', '{USERS['viewer']}', 'viewer', '2024-01-04'),
  ('{ORG_B}', '{USERS['other_admin']}', 'admin', '2024-01-05'), ('{ORG_B}', '{USERS['other_owner']}', 'owner', '2024-01-06'),
  ('{ORG_B}', '{USERS['member']}', 'viewer', '2024-02-01');
insert into public.profiles (id, email, full_name, organization_id) values
  ('{USERS['owner']}', 'olivia@a.test', 'Olivia Owner', '{ORG_A}'), ('{USERS['admin']}', 'adam@a.test', 'Adam Admin', '{ORG_A}'),
  ('{USERS['member']}', 'mia@a.test', 'Mia Member', null), ('{USERS['viewer']}', 'vic@a.test', 'Vic Viewer', '{ORG_A}'),
  ('{USERS['other_admin']}', 'bea@b.test', 'Bea Admin', '{ORG_B}'), ('{USERS['other_owner']}', 'bo@b.test', 'Bo Owner', '{ORG_B}');
insert into public.products (id, organization_id, sku, name, price) values
  ('{PRODUCT_A1}', '{ORG_A}', 'ALPHA-001', 'Anvil', 99.50), ('{PRODUCT_A2}', '{ORG_A}', 'ALPHA-002', 'Axe', 45.00),
  ('{PRODUCT_B1}', '{ORG_B}', 'BETA-001', 'Beaker', 12.00);
insert into public.inventory (id, organization_id, product_id, location, quantity, reserved_quantity) values
  ('{INVENTORY_A1}', '{ORG_A}', '{PRODUCT_A1}', 'main', 10, 2), ('{INVENTORY_B1}', '{ORG_B}', '{PRODUCT_B1}', 'main', 100, 0);
insert into public.api_keys (id, organization_id, name, key_prefix, key_hash, scopes, created_by) values
  ('{KEY_A}', '{ORG_A}', 'Alpha CI', 'ts_alpha_001', '{HASH_A}', '{{read,write}}', '{USERS['admin']}'),
  ('{KEY_B}', '{ORG_B}', 'Beta CI', 'ts_beta_0001', '{HASH_B}', '{{read}}', '{USERS['other_admin']}');
select public.log_security_event('login_failed', 'medium', '{ORG_A}', '{USERS['member']}', '198.51.100.10', '{{"attempt": 1}}');
select public.log_security_event('login_failed', 'medium', '{ORG_B}', '{USERS['other_admin']}', '198.51.100.20', '{{}}');
insert into public.rate_limits (key, window_start, window_length, max_requests, request_count)
  values ('ip:198.51.100.10', '2024-01-01 00:00:00+00', '1 minute', 10, 3);
insert into public.threat_intelligence (ip_address, threat_type, severity, source)
  values ('203.0.113.0/24', 'botnet', 'high', 'test feed');
insert into public.backup_verifications (backup_label, backup_sha256, backup_bytes, toc_entries, status)
  values ('preflight-2024-01-01.dump', '{"c" * 64}', 123456, 321, 'passed');
delete from public.data_retention_policies where table_name = 'backup_verifications';
"""


def data_fingerprint(db, schemas=("public", "auth"), tables=None, leaving_out=()) -> dict[str, str]:
    """md5 of every table's rows (sorted), to tell whether a run changed any data; `leaving_out`: columns not
    compared (updated_at, which an app's updates set to their own time)."""
    tables = tables or tables_in(db, schemas)
    row = f"(to_jsonb(x) - array{list(leaving_out)}::text[])::text" if leaving_out else "x::text"
    union = " union all ".join(f"select '{t}', md5(coalesce(string_agg({row}, '|' order by {row}), '')) from {t} as x"
                               for t in tables)
    return dict(db.query(union)) if tables else {}


def find_text(db, needles) -> list[tuple[str, str, str]]:
    """(table, column, needle) for every column (read as text), of every table outside PostgreSQL's
    own schemas, whose value contains one of the needles."""
    cols = db.query("""
        select format('%I.%I', n.nspname, c.relname), a.attname
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
          join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
         where c.relkind in ('r', 'p') and n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
         order by 1, 2""")
    by_table: dict[str, list[str]] = {}
    for table, column in cols:
        by_table.setdefault(table, []).append(column)
    found = []
    conn = db.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            # one scan per table counts every (column, needle): a connection and a query for each pair
            # took over ten seconds per database
            for table, columns in by_table.items():
                pairs = [(column, needle) for column in columns for needle in needles]
                counts = SQL(", ").join(SQL("count(*) filter (where strpos({}::text, %s) > 0)").format(Identifier(column))
                                        for column, _ in pairs)
                cur.execute(SQL("select {} from {}").format(counts, SQL(table)), [needle for _, needle in pairs])
                found += [(table, column, needle) for (column, needle), hits in zip(pairs, cur.fetchone()) if hits]
    finally:
        conn.close()
    return found


def physical_hits(db, tables, needles) -> list[tuple[str, str]]:
    """(table, needle) where a needle's bytes are in the table's heap or TOAST files (dead row versions and
    dropped columns included). Needs a superuser (pg_read_binary_file)."""
    found = []
    db.query("checkpoint")
    for table in tables:
        files = db.query("""
            select pg_relation_filepath(c.oid) from pg_class c where c.oid = %s::regclass
            union all
            select pg_relation_filepath(c.reltoastrelid) from pg_class c where c.oid = %s::regclass and c.reltoastrelid <> 0""",
                         (table, table))
        for (path,) in files:
            data = bytes(db.query("select pg_read_binary_file(%s)", (path,))[0][0])
            for needle in needles:
                if needle.encode() in data:
                    found.append((table, needle))
    return found


def uppercase_words(text: str) -> list[str]:
    """Keywords and unquoted identifiers written with capitals, in SQL and in the dollar-quoted bodies
    (function and DO bodies are scanned as well; comments and string constants are not)."""
    from pglast.parser import scan

    found = []
    for token in scan(text):
        word = text[token.start:token.end + 1]
        if token.name in ("SQL_COMMENT", "C_COMMENT") or word.startswith(("'", '"', "E'", "e'")):
            continue
        if token.name == "SCONST" and word.startswith("$"):
            tag_end = word.index("$", 1) + 1
            found += uppercase_words(word[tag_end:-tag_end])
        elif token.name != "SCONST" and word != word.lower():
            found.append(word)
    return found


def strip_sql_noise(text: str) -> str:
    """SQL text without comments and string literals (for keyword-case checks)."""
    text = re.sub(r"--[^\n]*", " ", text)
    return re.sub(r"'(?:[^']|'')*'", "''", text)


# -- one database for a whole module ------------------------------------------------------------------

# Built before a module opens its long transaction: phase 2 ends by rewriting tables (CLUSTER) and waits
# for older writing transactions anywhere in the cluster to end, so no template may be built while one of
# ours is open (the templates are built lazily, once per server).
TEMPLATES_BEFORE_A_MODULE_TRANSACTION = ("empty@3", "legacy@3", "variant@3")


def module_cursor(server, recipe: str, seed: str | None = None):
    """For a module-scoped fixture (`yield from`): one cursor on a clone of the recipe (with the seed SQL
    run on it, if given) for the whole module. Tests roll back to their savepoints; at the end the
    transaction is rolled back and the clone dropped."""
    for recipe_needed in TEMPLATES_BEFORE_A_MODULE_TRANSACTION:
        server.template(recipe_needed)
    db = server.create_database(recipe)
    try:
        if seed:
            db.execute(seed)
        conn = db.connect()
        try:
            with conn.cursor() as cur:
                yield cur
            conn.rollback()
        finally:
            conn.close()
    finally:
        server.drop_database(db)


def wait_until(observe, what: str, limit: float = 600, stopped=None):
    """What `observe()` returns once it is truthy: state the test can observe (pg_stat_activity,
    pg_locks, Dagster's instance), polled; never a timer. `limit` only bounds a hang. `stopped()`
    says why `what` can no longer come (e.g. the process that would do it ended), else nothing."""
    give_up = time.monotonic() + limit
    while not (seen := observe()):
        why = stopped() if stopped is not None else None
        assert not why, f"{what} cannot come: {why}"
        assert time.monotonic() < give_up, f"never saw {what}"
        time.sleep(0.05)
    return seen


@contextmanager
def app_writing(db, write, before: int = 20):
    """A legacy app on a connection and a thread of its own, calling `write(cursor, n)` for n = 0, 1, ...
    until the block ends; the block begins once `before` writes went through. Yields the errors its
    writes met (each a failed app statement)."""
    failures: list[str] = []
    written = [0]
    done = threading.Event()

    def loop():
        conn = db.connect(autocommit=True)
        try:
            with conn.cursor() as cur:
                for n in itertools.count():
                    if done.is_set():
                        break
                    try:
                        write(cur, n)
                        written[0] += 1
                    except psycopg2.Error as exc:
                        failures.append(str(exc))
        finally:
            conn.close()

    app = threading.Thread(target=loop)
    app.start()
    try:
        wait_until(lambda: written[0] > before, "the legacy app writing")
        yield failures
    finally:
        done.set()
        app.join()


def waiting_backend(db, application_name: str) -> int:
    """The pid of the session named so, once pg_locks shows it waiting for a lock."""
    rows = wait_until(lambda: db.query("""select a.pid from pg_stat_activity a join pg_locks l using (pid)
                                          where a.application_name = %s and not l.granted""", (application_name,)),
                      f"{application_name!r} waiting on a lock")
    return rows[0][0]
