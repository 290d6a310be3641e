"""Writes made after a deployment, which a rollback to the preflight backup would discard.

The verification records the post-deployment state (`record_row_state`, into the run's record as
``ROW_STATE_FILE``): per table of the app schemas, its primary key columns and, per row, the key
and a row hash (``snapshot.row_hash``: PostgreSQL's 64-bit hash of the row's values, the hash the
snapshot's checksums sum). Before a rollback restores, `compare` reads the same now and tells, per
table, which keys were inserted, updated (same key, other hash) or deleted since. A table without
a primary key is compared as a multiset of row hashes (an update is a delete and an insert).

`later_writes_sql` turns them into a script a DBA can re-apply after the rollback (or after the
deployment is fixed and re-run): one transaction; ``INSERT ... ON CONFLICT (key) DO UPDATE`` of
the inserted and updated rows as they are now (``json_populate_record`` of their ``row_to_json``,
so no type is spelled by hand), ``DELETE`` by key of the deleted ones. Triggers fire as for any
write (``updated_at`` moves, audit rows are written).

**Cost.** One sequential read of each app table at verification and again at the rollback (the
command line checks before it runs the notebook, so twice there), plus one more of each table
that changed, to fetch its changed rows. Hashing the values instead of the rows' text, and each
table's ``COPY`` streamed into the file, took the 1M benchmark's 3.2M rows from 22.6 s (19.3 s to
read, 3.3 s to write) to 7.9 s. The file is written as lines at gzip's fastest level: row hashes
do not compress, and at 1M products sorted JSON at level 9 took 30 s of the verification's 43 s
(lines at level 1: 4 s). About 25 bytes a row on disk (77 MB for the 3.2M
rows of the 1M benchmark); comparing holds one table's keys in memory at a time (~150 MB of
Python for 1M rows).

**File format** (``FORMAT`` 3): gzipped lines; the first a JSON object (format, taken_at, and per
table its schema, name, key and how many lines follow), then each table's lines in that order:
``key<TAB>hash`` (the key a JSON text, which never holds a raw tab or newline; as ``COPY`` writes it,
each backslash doubled), or for a table without a key ``hash<TAB>count``. The verification streams
each table's ``COPY`` into the file (``write_row_state``): no row passes through Python. Files of
formats 1 (one JSON object) and 2 (hashes of the rows' text, ``MD5_ROW_HASH``) still load, and are
compared by the hash they were written with.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from psycopg2 import sql

from . import records, snapshot

ROW_STATE_FILE = "post-deployment-rows.json.gz"   # in the deployment's record, written by the verification
SQL_FILE = "later_writes.sql"                      # in the rollback's record
SUMMARY_FILE = "later_writes.json"
FORMAT = 3
MD5_FORMATS = (1, 2)   # their hashes: MD5_ROW_HASH

# -- the tables of the app schemas, with their primary key columns and the columns a write sets
TABLES_SQL = """
select n.nspname, c.relname,
       array(select a.attname from pg_index i join unnest(i.indkey) with ordinality k(attnum, ord) on true
             join pg_attribute a on a.attrelid = c.oid and a.attnum = k.attnum
             where i.indrelid = c.oid and i.indisprimary order by k.ord)::text[] as key,
       array(select a.attname from pg_attribute a where a.attrelid = c.oid and a.attnum > 0
             and not a.attisdropped and a.attgenerated = '' order by a.attnum)::text[] as columns,
       array(select a.attname from pg_attribute a where a.attrelid = c.oid and a.attnum > 0
             and not a.attisdropped and a.attidentity = 'a' order by a.attnum)::text[] as always_identity
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where n.nspname = any (%s::text[]) and c.relkind in ('r', 'p') and not c.relispartition
order by 1, 2"""

# -- per row: its key (a json object of the key columns) and its 64-bit hash
ROWS_SQL = "select {key}, ({row_hash})::text from {table} as r"
MD5_ROW_HASH = "left(md5(r::text), 16)"


SHOW_SQL = ("-- in one repeatable-read, read-only transaction, for each table of the app schemas:\n"
            + TABLES_SQL.strip() + ";\n-- each row's primary key and a hash of it, compared with the post-deployment "
            "state the verification recorded\n" + ROWS_SQL.format(key="json_build_object(<key columns>)::text",
                                                                  row_hash=snapshot.ROW_HASH_OUTLINE,
                                                                  table="<table>") + ";\n"
            "-- then, for the tables that changed, the rows inserted or updated, for later_writes.sql\n"
            "select json_build_object(<key columns>)::text, row_to_json(r)::text from <table> as r;")


def _ident(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def _key_expression(key: list[str]) -> sql.Composable:
    if not key:
        return sql.SQL("null::text")
    return sql.SQL("json_build_object({})::text").format(
        sql.SQL(", ").join(sql.SQL("{}, r.{}").format(sql.Literal(k), sql.Identifier(k)) for k in key))


def _tables(cur) -> list[tuple[str, str, list[str], list[str], list[str]]]:
    cur.execute(TABLES_SQL, (snapshot.app_schemas(cur),))
    return cur.fetchall()


def _row_hash(cur, table: sql.Composable, state_format: int = FORMAT) -> sql.Composable:
    """The row hash a state of `state_format` holds, of a row of `table` read as r."""
    return sql.SQL(MD5_ROW_HASH) if state_format in MD5_FORMATS else snapshot.row_hash(cur, table)


def _table_rows(cur, schema, name, key, state_format: int = FORMAT) -> dict[str, str] | dict[str, int]:
    """{key: hash}, or for a table without a primary key {hash: how many rows}."""
    table = _ident(schema, name)
    cur.execute(sql.SQL(ROWS_SQL).format(key=_key_expression(key), row_hash=_row_hash(cur, table, state_format),
                                         table=table))
    if key:
        return dict(cur.fetchall())
    counts: dict[str, int] = {}
    for _, h in cur.fetchall():
        counts[h] = counts.get(h, 0) + 1
    return counts


# -- the state streamed into the file, per table: what COPY writes, keys as JSON texts (never a raw tab
# or newline: COPY escapes nothing in them but a backslash, as \\), and a keyless table's rows already counted
COPY_ROWS_SQL = "copy (select {key}, ({row_hash})::text from {table} as r) to stdout"
COPY_COUNTED_SQL = "copy (select ({row_hash})::text, count(*) from {table} as r group by 1) to stdout"


def write_row_state(conn, path, lock_timeout: str = "30s") -> tuple[Path, int, int]:
    """Every app table's keys and row hashes, read in one consistent read straight into `path` (FORMAT 3,
    the module's docstring): the path, and how many rows and tables it holds."""
    path = Path(path)
    records.make_folder(path.parent)
    tables: dict[str, dict] = {}
    rows = 0
    # keys and row hashes tell which rows exist: a data file (records.DATA_FILES), the owner's alone. The
    # rows go first into a gzip member of their own: the header, which counts them, is written before them.
    with records.open_for_writing(path, "wb") as raw, tempfile.TemporaryFile(dir=path.parent) as bodies:
        # COPY hands over one row per write: buffered, gzip sees few and large ones
        with snapshot._consistent_read(conn, lock_timeout) as cur, \
                gzip.GzipFile(fileobj=bodies, mode="wb", compresslevel=1) as zipped, \
                io.BufferedWriter(zipped, buffer_size=1 << 20) as buffered:
            cur.execute("""select to_char(clock_timestamp(), 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
                                  set_config('client_encoding', 'UTF8', true)""")
            taken_at = cur.fetchone()[0]
            for schema, name, key, _, _ in _tables(cur):
                table = _ident(schema, name)
                copy = sql.SQL(COPY_ROWS_SQL if key else COPY_COUNTED_SQL).format(
                    key=_key_expression(key), row_hash=_row_hash(cur, table), table=table)
                cur.copy_expert(copy.as_string(cur), buffered)
                tables[f"{schema}.{name}"] = {"schema": schema, "table": name, "key": key, "lines": cur.rowcount}
                rows += cur.rowcount if key else snapshot.count_rows(cur, table)
        header = {"format": FORMAT, "taken_at": taken_at, "tables": tables}
        raw.write(gzip.compress((json.dumps(header) + "\n").encode(), compresslevel=1))
        bodies.seek(0)
        shutil.copyfileobj(bodies, raw)
    return path, rows, len(tables)


def load_row_state(path) -> dict:
    with gzip.open(Path(path), "rt", encoding="utf-8", newline="\n") as f:
        header = json.loads(f.readline())
        if header.get("format", 1) == 1:   # the whole file one JSON object, as written before
            return header
        unescape = header["format"] >= 3      # COPY's doubled backslashes (COPY_ROWS_SQL)
        tables = {}
        for name, t in header["tables"].items():
            pairs = (f.readline().rstrip("\n").split("\t") for _ in range(t["lines"]))
            rows = ({k.replace("\\\\", "\\") if unescape else k: v for k, v in pairs} if t["key"]
                    else {k: int(v) for k, v in pairs})
            tables[name] = {"schema": t["schema"], "table": t["table"], "key": t["key"], "rows": rows}
    return {"format": header["format"], "taken_at": header["taken_at"], "tables": tables}


def record_row_state(conn, record_dir) -> str:
    """Take and save the post-deployment state into the record; a sentence saying what was kept."""
    path, rows, tables = write_row_state(conn, Path(record_dir) / ROW_STATE_FILE)
    return f"post-deployment state kept for a rollback ({path.name}: keys and row hashes of {rows} rows in " \
           f"{tables} tables)"


@dataclass
class TableWrites:
    table: str
    schema: str
    name: str
    key: list[str]
    inserted: list[str] = field(default_factory=list)   # keys (json), or row hashes for a table without a key
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    note: str = ""                                        # a table created or dropped since

    @property
    def total(self) -> int:
        return len(self.inserted) + len(self.updated) + len(self.deleted)

    def describe(self) -> str:
        return f"{self.table}: {len(self.inserted)} inserted, {len(self.updated)} updated, {len(self.deleted)} " \
               f"deleted" + (f" ({self.note})" if self.note else "")


@dataclass
class LaterWrites:
    since: str
    tables: list[TableWrites]
    state_format: int = FORMAT   # of the state compared with: its row hashes are the ones kept here

    @property
    def total(self) -> int:
        return sum(t.total for t in self.tables)

    @property
    def any(self) -> bool:
        """Anything a rollback would discard: rows, or a table created or dropped since."""
        return any(t.total or t.note for t in self.tables)

    def describe(self) -> str:
        return "; ".join(t.describe() for t in self.tables if t.total or t.note) or "none"

    def as_dict(self) -> dict:
        return {"since": self.since, "rows": self.total,
                "tables": [{"table": t.table, "inserted": len(t.inserted), "updated": len(t.updated),
                            "deleted": len(t.deleted), "note": t.note} for t in self.tables if t.total or t.note]}


def _multiset_diff(then: dict[str, int], now: dict[str, int]) -> tuple[list[str], list[str]]:
    inserted = [h for h, n in now.items() for _ in range(n - then.get(h, 0))]
    deleted = [h for h, n in then.items() for _ in range(n - now.get(h, 0))]
    return inserted, deleted


def compare(conn, state: dict, lock_timeout: str = "30s") -> LaterWrites:
    """What was inserted, updated and deleted since `state` was taken, per table, read now."""
    found: list[TableWrites] = []
    with snapshot._consistent_read(conn, lock_timeout) as cur:
        now_tables = {f"{s}.{n}": (s, n, key) for s, n, key, _, _ in _tables(cur)}
        for table in sorted(set(state["tables"]) | set(now_tables)):
            then = state["tables"].get(table)
            if table not in now_tables:
                found.append(TableWrites(table, then["schema"], then["table"], then["key"],
                                         note=f"table dropped since, it had {len(then['rows'])} rows"))
                continue
            schema, name, key = now_tables[table]
            rows = _table_rows(cur, schema, name, key, state.get("format", 1))
            writes = TableWrites(table, schema, name, key)
            if then is None:
                writes.note = "table created since"
                writes.inserted = list(rows) if key else _multiset_diff({}, rows)[0]
            elif then["key"] != key:
                writes.note = f"primary key changed since ({then['key']} -> {key}): compared as whole rows"
                writes.inserted, writes.deleted = _multiset_diff(_as_multiset(then), _as_multiset(
                    {"key": key, "rows": rows}))
                writes.key = []
            elif key:
                old = then["rows"]
                writes.inserted = sorted(k for k in rows if k not in old)
                writes.updated = sorted(k for k in rows if k in old and old[k] != rows[k])
                writes.deleted = sorted(k for k in old if k not in rows)
            else:
                writes.inserted, writes.deleted = _multiset_diff(then["rows"], rows)
            found.append(writes)
    return LaterWrites(state.get("taken_at", "?"), found, state.get("format", 1))


def _as_multiset(table_state: dict) -> dict[str, int]:
    if not table_state["key"]:
        return table_state["rows"]
    counts: dict[str, int] = {}
    for h in table_state["rows"].values():
        counts[h] = counts.get(h, 0) + 1
    return counts


# -- the script that puts them back -------------------------------------------------------------------

def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _quote(name: str) -> str:
    """Always quoted: a column may be named by a reserved word (user, order)."""
    return '"' + name.replace('"', '""') + '"'


def _upsert(qualified: str, key: list[str], columns: list[str], always: list[str], row_json: str) -> str:
    cols = ", ".join(_quote(c) for c in columns)
    source = f"SELECT {cols} FROM pg_catalog.json_populate_record(NULL::{qualified}, {_literal(row_json)})"
    overriding = " OVERRIDING SYSTEM VALUE" if always else ""
    if not key:
        return f"INSERT INTO {qualified} ({cols}){overriding}\n  {source};"
    settable = [c for c in columns if c not in key and c not in always]
    action = "DO NOTHING" if not settable else (
        "DO UPDATE SET (" + ", ".join(_quote(c) for c in settable) + ") = ROW("
        + ", ".join(f"EXCLUDED.{_quote(c)}" for c in settable) + ")")
    return (f"INSERT INTO {qualified} ({cols}){overriding}\n  {source}\n  ON CONFLICT ("
            + ", ".join(_quote(k) for k in key) + f") {action};")


def _delete(qualified: str, key: list[str], key_json: str) -> str:
    cols = ", ".join(_quote(k) for k in key)
    return (f"DELETE FROM {qualified} WHERE ({cols}) IN (SELECT {cols} FROM "
            f"pg_catalog.json_populate_record(NULL::{qualified}, {_literal(key_json)}));")


def _delete_by_hash(qualified: str, hash_expression: str, row_hash: str) -> str:
    return (f"DELETE FROM {qualified} WHERE ctid = (SELECT ctid FROM {qualified} AS r "
            f"WHERE ({hash_expression})::text = {_literal(row_hash)} LIMIT 1);")


# -- which table references which (foreign keys between app tables): parents are written first
REFERENCES_SQL = """
select cn.nspname || '.' || c.relname, fn.nspname || '.' || f.relname
from pg_constraint co
join pg_class c on c.oid = co.conrelid join pg_namespace cn on cn.oid = c.relnamespace
join pg_class f on f.oid = co.confrelid join pg_namespace fn on fn.oid = f.relnamespace
where co.contype = 'f' and co.conrelid <> co.confrelid"""


def _parents_first(tables: list[TableWrites], references: list[tuple[str, str]]) -> list[TableWrites]:
    """The tables ordered so that a referenced table comes before the tables referencing it
    (in a cycle, by name: the script then fails and rolls back, saying which row)."""
    by_name = {t.table: t for t in tables}
    parents = {t.table: {p for c, p in references if c == t.table and p in by_name} for t in tables}
    ordered: list[TableWrites] = []
    while parents:
        ready = sorted(n for n, ps in parents.items() if not ps) or [sorted(parents)[0]]
        for name in ready:
            ordered.append(by_name[name])
            del parents[name]
        for ps in parents.values():
            ps.difference_update(ready)
    return ordered


# every name in the script is schema-qualified; search_path stays as is, for the app's triggers
SETTINGS = ("SET standard_conforming_strings = on;\nSET DateStyle = 'ISO, YMD';\n"
            "SET TimeZone = 'UTC';\nSET IntervalStyle = 'postgres';\nSET extra_float_digits = 1;\n"
            "SET bytea_output = 'hex';")


def later_writes_sql(conn, writes: LaterWrites, rollback_of: str) -> str:
    """The script that re-applies `writes` (rows as they are now): read in one consistent read."""
    lines = [f"-- Writes made after the deployment of run {rollback_of} (its verification recorded the state at "
             f"{writes.since}),",
             "-- kept by its rollback before it discarded them. Re-apply with:",
             "--   psql -X -v ON_ERROR_STOP=1 -f later_writes.sql",
             "-- after the rollback (or after the deployment is fixed and run again): one transaction; rows inserted or",
             "-- updated are written as they were at the rollback (INSERT ... ON CONFLICT DO UPDATE), rows deleted are",
             "-- deleted again. Triggers fire as for any write. These are app rows: keep this file as a backup is kept.",
             "BEGIN;", SETTINGS]
    with snapshot._consistent_read(conn, "30s") as cur:
        meta = {(s, n): (cols, always) for s, n, _, cols, always in _tables(cur)}
        cur.execute(REFERENCES_SQL)
        references = cur.fetchall()
        changed = _parents_first([t for t in writes.tables if t.total], references)
        lines += [f"\n-- {t.describe()}: not re-applied by this script" for t in writes.tables if t.note and not t.total]
        # rows inserted or updated, parents first; then rows deleted, children first
        for t in changed:
            qualified = f"{_quote(t.schema)}.{_quote(t.name)}"
            columns, always = meta.get((t.schema, t.name), ([], []))
            upserts = _upserts(cur, t, qualified, columns, always, writes.state_format)
            lines += [f"\n-- {t.describe()}: rows inserted or updated", *upserts] if upserts else []
        for t in reversed(changed):
            if t.deleted:
                lines.append(f"\n-- {t.table}: rows deleted")
                qualified = f"{_quote(t.schema)}.{_quote(t.name)}"
                if t.key:
                    lines += [_delete(qualified, t.key, k) for k in t.deleted]
                else:
                    hashed = _row_hash(cur, _ident(t.schema, t.name), writes.state_format).as_string(cur)
                    lines += [_delete_by_hash(qualified, hashed, h) for h in t.deleted]
    lines.append("\nCOMMIT;")
    return "\n".join(lines) + "\n"


def _upserts(cur, t: TableWrites, qualified: str, columns: list[str], always: list[str],
             state_format: int) -> list[str]:
    """INSERT ... ON CONFLICT of the table's inserted and updated rows, as they are now."""
    lines: list[str] = []
    if t.key:
        wanted = set(t.inserted + t.updated)
        if wanted:
            cur.execute(sql.SQL("select {key}, row_to_json(r)::text from {table} as r").format(
                key=_key_expression(t.key), table=_ident(t.schema, t.name)))
            lines += [_upsert(qualified, t.key, columns, always, row) for k, row in sorted(cur.fetchall())
                      if k in wanted]
    elif t.inserted:
        table = _ident(t.schema, t.name)
        cur.execute(sql.SQL("select ({})::text, row_to_json(r)::text from {} as r").format(
            _row_hash(cur, table, state_format), table))
        pending: dict[str, int] = {}
        for h in t.inserted:
            pending[h] = pending.get(h, 0) + 1
        for h, row in cur.fetchall():
            if pending.get(h, 0) > 0:
                pending[h] -= 1
                lines.append(_upsert(qualified, [], columns, always, row))
    return lines
