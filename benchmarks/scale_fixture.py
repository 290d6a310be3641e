"""A legacy database of production size, generated in set-based SQL and cached as a template database.

    .venv/bin/python -m benchmarks.scale_fixture --size 100k [--pg-bin DIR] [--data-dir DIR]

The shapes are the audited legacy fixture's (sql/support/legacy_fixture.sql: its DDL is loaded as
is, on the Supabase shim), the rows are generated, N organizations x M products:

- per organization an owner, an admin, a member and a viewer (auth.users, profiles, memberships);
  in every 10th organization a fifth member whose auth user is gone (profile and membership kept);
  every 20th organization's admin is also an 'editor' (no contract role) of the next one; every
  50th organization has a slug that breaks validate_org_slug;
- products (M / N per organization): every 1000th a lowercase twin of the SKU before it, every
  1000th a negative price; inventory, a 'main' row per product and a 'backup' row for every 10th
  (~1.1 per product), every 1000th with a negative quantity, every 1000th reserving more than it holds;
- api_keys, 3 per organization: two plaintext keys ("key"; one revoked), and a third that is either
  plaintext with the key_hash newer code wrote, or a key_hash alone;
- audit_logs, one per product in the two conflicting shapes (entity_type/entity_id text/changes
  jsonb with {"old", "new"} or the new values alone, table_name/record_id/new_data, or both), ids
  that are no uuid ('legacy-42'), ip values that are no inet ('unknown', an X-Forwarded-For list);
  plus per plaintext key its creation with the key copied into changes->>'key', per organization a
  bot that logged its key in user_agent and quoted it inside a jsonb string, and a login failure
  without an organization.

Sizes: tiny (2 x 200, the smoke test), 100k (100 x 100,000), 1M (1,000 x 1,000,000, the default),
10M (10,000 x 10,000,000), or ORGSxPRODUCTS.

Shapes (--shape): the rows are generated in the audited fixture's shape, then the schema is changed into
another legacy shape the phases converge (TRANSFORMS: each a column conversion or a table variant, in plain
ALTER statements; generation time, not the benchmark's): 'legacy' (the audited fixture as it is, the
default), 'variant' (the table variants of tests/fixtures/legacy_variant.sql: memberships keyed by
organization and user without id, inventory without organization, other column names), 'unseen' (every
column conversion of tests/fixtures/legacy_unseen.sql at once: unbounded numeric price, character(3)
currency, varchar SKU, an enum role, numeric and smallint quantities, naive timestamps under an index,
json settings, text ids in the log, foreign keys ON DELETE RESTRICT, nullable columns, no checks), or
transforms joined to a shape by '+' (e.g. legacy+price_numeric), one conversion at a time.

The template is named after the size, the shape and a digest of everything that shapes it, so a changed
generator builds a new one and drops the old.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from dataclasses import dataclass

import psycopg2

from runbooks import fixtures, paths, runner

DATA_MARKER = "-- the data:"   # where the legacy fixture's DDL ends and its rows begin
TEMPLATE_PREFIX = "bench_legacy_"


@dataclass(frozen=True)
class Size:
    """N organizations x M products (M a multiple of N)."""

    label: str
    orgs: int
    products: int

    @property
    def per_org(self) -> int:
        return self.products // self.orgs


NAMED_SIZES = {
    "tiny": Size("tiny", 2, 200),
    "100k": Size("100k", 100, 100_000),
    "1M": Size("1M", 1_000, 1_000_000),
    "10M": Size("10M", 10_000, 10_000_000),
}


def parse_size(text: str) -> Size:
    """'100k', '1M', 'tiny' or 'ORGSxPRODUCTS' (e.g. '2x200'); ValueError names what is wrong."""
    for name, size in NAMED_SIZES.items():
        if text.strip().lower() == name.lower():
            return size
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"size {text!r}: use one of {', '.join(NAMED_SIZES)} or ORGSxPRODUCTS (e.g. 2x200)")
    orgs, products = int(match.group(1)), int(match.group(2))
    if orgs < 2 or products < orgs * 40 or products % orgs:
        raise ValueError(f"size {text!r}: at least 2 organizations, at least 40 products each, and the "
                         "products a multiple of the organizations (every legacy oddity must fit)")
    return Size(f"{orgs}x{products}", orgs, products)


def legacy_ddl() -> str:
    """The legacy fixture's functions, tables, triggers and policies, without its rows."""
    text = paths.LEGACY_FIXTURE_FILE.read_text()
    return text[:text.index(DATA_MARKER)]


# Each statement takes %(orgs)s, %(products)s and %(per_org)s. Ids are md5-derived uuids, so that the
# same size always generates the same rows.
GENERATE_SQL = [
    # people: four users per organization (1 owner, 2 admin, 3 member, 4 viewer)
    """insert into auth.users (id, aud, role, email, email_confirmed_at, raw_user_meta_data, created_at, updated_at)
    select md5('bench-user-' || o || '-' || r)::uuid, 'authenticated', 'authenticated',
           format('u%%s.org%%s@bench.test', r, o), t.ts,
           jsonb_build_object('full_name', format('User %%s of org %%s', r, o)), t.ts, t.ts
    from generate_series(1, %(orgs)s) o, generate_series(1, 4) r,
         lateral (select timestamptz '2023-01-01 09:00+00' + (o * 5 + r) * interval '1 minute' as ts) t""",

    # organizations: every 50th with a slug that breaks validate_org_slug
    """insert into public.organizations (id, name, slug, settings, created_at, updated_at)
    select md5('bench-org-' || o)::uuid, 'Organization ' || o,
           case when o %% 50 = 2 then format('Org_%%s_Legacy', o) else 'org-' || lpad(o::text, 5, '0') end,
           case when o %% 3 = 0 then '{"plan": "legacy"}' else '{}' end::jsonb, t.ts, t.ts
    from generate_series(1, %(orgs)s) o,
         lateral (select timestamptz '2023-01-01 09:00+00' + o * interval '1 hour' as ts) t""",

    # profiles: one per user, and one for a member whose auth user is gone (every 10th organization)
    """insert into public.profiles (id, email, full_name, organization_id, created_at, updated_at)
    select md5('bench-user-' || o || '-' || r)::uuid, format('u%%s.org%%s@bench.test', r, o),
           format('User %%s of org %%s', r, o),
           case when r = 4 and o %% 7 = 2 then null else md5('bench-org-' || o)::uuid end, t.ts, t.ts
    from generate_series(1, %(orgs)s) o, generate_series(1, 5) r,
         lateral (select timestamptz '2023-01-01 09:00+00' + (o * 5 + r) * interval '1 minute' as ts) t
    where r < 5 or o %% 10 = 1""",

    # memberships: the four roles, the gone user's, and an 'editor' of the next organization
    """insert into public.organization_members (id, organization_id, user_id, role, created_at, updated_at)
    select md5('bench-member-' || o || '-' || r)::uuid, md5('bench-org-' || o)::uuid,
           md5('bench-user-' || o || '-' || r)::uuid, (array['owner', 'admin', 'member', 'viewer', 'member'])[r],
           t.ts, t.ts
    from generate_series(1, %(orgs)s) o, generate_series(1, 5) r,
         lateral (select timestamptz '2023-01-01 09:05+00' + (o * 5 + r) * interval '1 minute' as ts) t
    where r < 5 or o %% 10 = 1
    union all
    select md5('bench-member-editor-' || o)::uuid, md5('bench-org-' || (o + 1))::uuid,
           md5('bench-user-' || o || '-2')::uuid, 'editor', timestamptz '2023-06-01 08:00+00', timestamptz '2023-06-01 08:00+00'
    from generate_series(1, %(orgs)s - 1) o where o %% 20 = 1""",

    # products: a lowercase twin of the previous SKU and a negative price, every 1000th each
    """insert into public.products (id, organization_id, sku, name, description, price, created_at, updated_at)
    select md5('bench-product-' || i)::uuid, md5('bench-org-' || k.o)::uuid,
           case when k.j %% 1000 = 7 then 'sku-' || lpad((k.j - 1)::text, 6, '0') else 'SKU-' || lpad(k.j::text, 6, '0') end,
           'Product ' || k.j, case when i %% 4 <> 0 then 'Generated product ' || i end,
           case when k.j %% 1000 = 13 then -5.00 else 1 + (i * 37 %% 10000) / 100.0 end,
           k.ts, k.ts + (i %% 90) * interval '1 day'
    from generate_series(1, %(products)s) i,
         lateral (select (i - 1) / %(per_org)s + 1 as o, (i - 1) %% %(per_org)s + 1 as j,
                         timestamptz '2023-01-10 10:00+00' + i * interval '1 second' as ts) k""",

    # inventory: 'main' for each product, 'backup' for every 10th; negative and over-reserved stock
    """insert into public.inventory (id, organization_id, product_id, location, quantity, reserved_quantity,
                                  created_at, updated_at)
    select md5('bench-inventory-' || i || '-' || loc)::uuid, md5('bench-org-' || k.o)::uuid,
           md5('bench-product-' || i)::uuid, loc,
           case when loc = 'main' and k.j %% 1000 = 21 then -3 when loc = 'main' and k.j %% 1000 = 33 then 4
                else 10 + i * 13 %% 500 end,
           case when loc = 'main' and k.j %% 1000 = 33 then 10 when loc = 'main' then i %% 5 else 0 end,
           k.ts, k.ts
    from generate_series(1, %(products)s) i,
         lateral (select (i - 1) / %(per_org)s + 1 as o, (i - 1) %% %(per_org)s + 1 as j,
                         timestamptz '2023-01-10 10:00+00' + i * interval '1 second' as ts) k,
         unnest(array['main', 'backup']) loc
    where loc = 'main' or k.j %% 10 = 0""",

    # api keys: two plaintext (one revoked); a third plaintext with key_hash, or a key_hash alone
    """insert into public.api_keys (id, organization_id, name, key, permissions, created_by, last_used, expires_at,
                                 is_active, created_at, updated_at, key_hash)
    select md5('bench-key-' || o || '-' || k)::uuid, md5('bench-org-' || o)::uuid,
           (array['CI deploy', 'Old integration', case when o %% 2 = 0 then 'Reporting' else 'Webhook signer' end])[k],
           case when k = 3 and o %% 2 = 1 then null else s.plain end,
           (array['["read", "write"]', '["read"]', case when o %% 2 = 0 then '["read"]' else '["webhooks"]' end])[k]::jsonb,
           md5('bench-user-' || o || '-2')::uuid, case when k < 3 then s.ts + interval '30 days' end,
           case when k = 3 and o %% 2 = 0 then timestamptz '2027-12-31 23:59:59+00' end, k <> 2, s.ts, s.ts,
           case when k = 3 and o %% 2 = 0 then encode(sha256(convert_to(s.plain, 'UTF8')), 'hex')
                when k = 3 then md5('bench-signer-' || o) || md5('bench-signer-2-' || o) end
    from generate_series(1, %(orgs)s) o, generate_series(1, 3) k,
         lateral (select (case when k = 3 then 'ts_test_' else 'ts_live_' end) || md5('bench-secret-' || o || '-' || k) as plain,
                         timestamptz '2023-03-01 09:00+00' + o * interval '1 hour' as ts) s""",

    # audit trail: one row per product, in the first shape, the later one, or both
    """insert into public.audit_logs (organization_id, user_id, action, entity_type, entity_id, changes, ip, user_agent,
                                   created_at, table_name, record_id, new_data)
    select md5('bench-org-' || k.o)::uuid, md5('bench-user-' || k.o || '-2')::uuid,
           (array['create', 'update', 'stock_adjustment', 'update', 'update'])[k.s + 1],
           case when k.s in (0, 1, 4) then 'product' when k.s = 2 then 'inventory' end,
           case when k.s in (0, 1, 4) then k.pid::text when k.s = 2 then 'legacy-' || i end,
           case k.s when 0 then jsonb_build_object('new', jsonb_build_object('sku', 'SKU-' || lpad(k.j::text, 6, '0'),
                                                                            'name', 'Product ' || k.j, 'price', k.price))
                    when 1 then jsonb_build_object('old', jsonb_build_object('price', k.price),
                                                   'new', jsonb_build_object('price', k.price + 1))
                    when 2 then jsonb_build_object('quantity', k.j %% 50)
                    when 4 then jsonb_build_object('name', 'Product ' || k.j) end,
           case when k.s = 3 then null when i %% 50 = 1 then 'unknown' when k.s = 2 then '10.0.0.1, 10.0.0.2'
                else '203.0.113.' || (i %% 250 + 1) end,
           'Mozilla/5.0', k.ts,
           case when k.s in (3, 4) then 'products' end, case when k.s in (3, 4) then k.pid end,
           case when k.s = 3 then jsonb_build_object('price', k.price) end
    from generate_series(1, %(products)s) i,
         lateral (select (i - 1) / %(per_org)s + 1 as o, (i - 1) %% %(per_org)s + 1 as j, i %% 5 as s,
                         md5('bench-product-' || i)::uuid as pid, 1 + (i * 37 %% 10000) / 100.0 as price,
                         timestamptz '2023-01-10 10:00+00' + i * interval '1 second' as ts) k""",

    # the plaintext keys copied into the audit trail: changes->>'key' when each was created
    """insert into public.audit_logs (organization_id, user_id, action, entity_type, entity_id, changes, ip, user_agent,
                                   created_at)
    select organization_id, created_by, 'api_key.created', 'api_key', id::text,
           jsonb_build_object('name', name, 'key', key), '198.51.100.23', 'Mozilla/5.0', created_at
    from public.api_keys where key is not null""",

    # ... and in text: a bot that logged its key in user_agent and quoted it inside a jsonb string
    """insert into public.audit_logs (organization_id, user_id, action, entity_type, entity_id, changes, ip, user_agent,
                                   created_at)
    select organization_id, created_by, 'api_key.used', 'api_key', id::text,
           jsonb_build_object('note', 'called with ' || key), 'unknown', 'deploy-bot/2.1 key=' || key,
           created_at + interval '1 day'
    from public.api_keys where name = 'CI deploy'""",

    # a failed login without organization or user, per organization
    """insert into public.audit_logs (action, changes, ip, user_agent, created_at)
    select 'login_failed', jsonb_build_object('email', format('mallory%%s@example.test', o)), '192.0.2.66',
           'python-requests/2.31', timestamptz '2024-04-01 03:00+00' + o * interval '1 minute'
    from generate_series(1, %(orgs)s) o""",
]


# Each transform changes the generated (audited fixture's) schema into one legacy shape the phases converge.
TRANSFORMS: dict[str, tuple[str, ...]] = {
    # column conversions that read or rewrite rows (converted online by phase 2)
    "price_numeric": ("alter table public.products alter column price type numeric",),
    "currency_char": ("alter table public.products add column currency character(3) not null default 'EUR'",),
    "sku_varchar": ("alter table public.products alter column sku type varchar(64)",),
    "role_enum": ("create type public.member_role as enum ('owner', 'admin', 'member', 'viewer', 'editor')",
                  "alter table public.organization_members drop constraint organization_members_role_check",
                  "alter table public.organization_members alter column role drop default",
                  "alter table public.organization_members alter column role type public.member_role using role::public.member_role",
                  "alter table public.organization_members alter column role set default 'member'"),
    "quantity_numeric": ("alter table public.inventory alter column quantity type numeric",),
    "reserved_smallint": ("alter table public.inventory alter column reserved_quantity type smallint",),
    "timestamps_naive": ("alter table public.products alter column created_at type timestamp using created_at at time zone 'UTC'",
                         "alter table public.products alter column updated_at type timestamp using updated_at at time zone 'UTC'",
                         "create index products_created_at_legacy_idx on public.products (created_at)",
                         "alter table public.audit_logs alter column created_at type timestamp using created_at at time zone 'UTC'"),
    "settings_json": ("alter table public.organizations alter column settings type json",),
    "audit_text_ids": ("alter table public.audit_logs alter column organization_id type text",),
    # rules a legacy table lacks or states otherwise
    "fk_restrict": ("alter table public.products drop constraint products_organization_id_fkey",
                    "alter table public.products add constraint products_organization_id_fkey foreign key (organization_id) "
                    "references public.organizations (id) on delete restrict",
                    "alter table public.inventory drop constraint inventory_product_id_fkey",
                    "alter table public.inventory add constraint inventory_product_id_fkey foreign key (product_id) "
                    "references public.products (id) on delete restrict"),
    "nullable": ("alter table public.products alter column sku drop not null, alter column name drop not null, "
                 "alter column price drop not null",),
    "checks_missing": ("alter table public.products drop constraint products_name_length",
                       "alter table public.organization_members drop constraint if exists organization_members_role_check"),
    # table variants (tests/fixtures/legacy_variant.sql)
    "members_without_id": ("alter table public.organization_members drop constraint organization_members_pkey",
                           "alter table public.organization_members drop column id",
                           "alter table public.organization_members drop constraint organization_members_organization_id_user_id_key",
                           "alter table public.organization_members rename column organization_id to org_id",
                           "alter table public.organization_members add primary key (org_id, user_id)"),
    "inventory_without_org": ("drop policy if exists inventory_admin_write on public.inventory",
                              "alter table public.inventory drop column organization_id",
                              "alter table public.inventory rename column location to warehouse",
                              "alter table public.inventory rename column quantity to qty",
                              "alter table public.inventory rename column reserved_quantity to reserved"),
    "variant_names": ("alter table public.profiles rename column full_name to display_name",
                      "alter table public.products rename column price to unit_price",
                      "alter table public.products alter column unit_price type numeric(14, 4)",
                      "alter table public.audit_logs rename column organization_id to org_id",
                      "alter table public.audit_logs rename column user_id to actor_id",
                      "alter table public.audit_logs rename column action to operation",
                      "alter table public.audit_logs rename column entity_type to resource_type",
                      "alter table public.audit_logs rename column entity_id to resource_id",
                      "alter table public.audit_logs alter column ip type varchar(45)",
                      "alter table public.audit_logs rename column ip to ip_addr",
                      "alter table public.api_keys rename column name to label",
                      "alter table public.api_keys rename column key to api_key",
                      "alter table public.api_keys rename column is_active to active"),
}
SHAPES: dict[str, tuple[str, ...]] = {
    "legacy": (),
    "variant": ("members_without_id", "inventory_without_org", "variant_names", "timestamps_naive"),
    "unseen": ("price_numeric", "currency_char", "sku_varchar", "role_enum", "quantity_numeric", "reserved_smallint",
               "timestamps_naive", "settings_json", "audit_text_ids", "fk_restrict", "nullable", "checks_missing"),
}


def parse_shape(text: str) -> tuple[str, tuple[str, ...]]:
    """'legacy', 'variant', 'unseen', or a shape and transforms joined by '+': (label, transforms in
    order); ValueError names what is unknown."""
    parts = [p.strip() for p in text.strip().split("+")]
    unknown = [p for p in parts if p not in SHAPES and p not in TRANSFORMS]
    if not text.strip() or unknown:
        raise ValueError(f"shape {text!r}: use one of {', '.join(SHAPES)}, or transforms joined by '+' "
                         f"({', '.join(TRANSFORMS)})")
    transforms = [t for p in parts for t in (SHAPES[p] if p in SHAPES else (p,))]
    return "+".join(parts), tuple(dict.fromkeys(transforms))


def expected_counts(size: Size) -> dict[str, int]:
    """The rows the generator writes, per table (what the smoke test checks)."""
    orgs = range(1, size.orgs + 1)
    gone = sum(1 for o in orgs if o % 10 == 1)
    editors = sum(1 for o in range(1, size.orgs) if o % 20 == 1)
    plaintext = 2 * size.orgs + sum(1 for o in orgs if o % 2 == 0)
    return {
        "auth.users": 4 * size.orgs,
        "public.organizations": size.orgs,
        "public.profiles": 4 * size.orgs + gone,
        "public.organization_members": 4 * size.orgs + gone + editors,
        "public.products": size.products,
        "public.inventory": size.products + size.orgs * (size.per_org // 10),
        "public.api_keys": 3 * size.orgs,
        "public.audit_logs": size.products + plaintext + 2 * size.orgs,
    }


def digest(size: Size, shape: str = "legacy") -> str:
    """What shapes the template: the shim, the legacy DDL, the generator, the size, the shape's transforms."""
    transforms = [sql for t in parse_shape(shape)[1] for sql in TRANSFORMS[t]]
    parts = [paths.SHIM_FILE.read_text(), legacy_ddl(), *GENERATE_SQL, repr(size), *transforms]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:10]


def template_name(size: Size, shape: str = "legacy") -> str:
    label = parse_shape(shape)[0]
    tag = "" if label == "legacy" else re.sub(r"[^a-z0-9]+", "_", label.lower()) + "_"
    return f"{TEMPLATE_PREFIX}{size.label.lower()}_{tag}{digest(size, shape)}"


def generate(conn, size: Size, progress=print, shape: str = "legacy") -> None:
    """Load the shim and the legacy DDL into an empty database, generate the rows, and change the schema
    into the shape asked for (one transaction)."""
    fixtures.load_shim(conn)
    params = {"orgs": size.orgs, "products": size.products, "per_org": size.per_org}
    with conn.cursor() as cur:
        cur.execute(legacy_ddl())
        # bulk load: no user or foreign-key triggers per row (the rows are consistent by construction)
        cur.execute("set local session_replication_role = replica")
        for statement in GENERATE_SQL:
            started = time.perf_counter()
            cur.execute(statement, params)
            progress(f"  {cur.rowcount:>10} rows  {time.perf_counter() - started:7.1f}s  {_first_line(statement)}")
        for transform in parse_shape(shape)[1]:
            started = time.perf_counter()
            for statement in TRANSFORMS[transform]:
                cur.execute(statement)
            progress(f"  {'shape':>10}       {time.perf_counter() - started:7.1f}s  {transform}")
    conn.commit()


def _first_line(statement: str) -> str:
    return " ".join(statement.split())[:70]


def vacuum_analyze(conn) -> None:
    """Set hint bits, the visibility map and statistics, as a long-lived database has them."""
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("vacuum (analyze, freeze)")


def _admin(pg):
    conn = psycopg2.connect(pg.conninfo("postgres"))
    conn.autocommit = True
    return conn


def template_exists(pg, name: str) -> bool:
    conn = _admin(pg)
    try:
        with conn.cursor() as cur:
            cur.execute("select exists (select 1 from pg_database where datname = %s)", (name,))
            return cur.fetchone()[0]
    finally:
        conn.close()


def ensure_template(pg, size: Size, progress=print, shape: str = "legacy") -> tuple[str, float | None]:
    """(template name, seconds spent building it, or None when it was cached). Built under a
    temporary name and renamed when complete, so an interrupted build is never taken for a template."""
    name = template_name(size, shape)
    if template_exists(pg, name):
        return name, None
    building = f"{name}_building"
    started = time.perf_counter()
    conn = _admin(pg)
    try:
        with conn.cursor() as cur:
            cur.execute(f"drop database if exists {building} with (force)")
            cur.execute(f"create database {building} template template0")
    finally:
        conn.close()
    progress(f"generating {size.orgs} organizations x {size.products} products ({shape} shape) into {building}")
    conn = psycopg2.connect(pg.conninfo(building))
    try:
        generate(conn, size, progress, shape)
        vacuum_analyze(conn)
    finally:
        conn.close()
    conn = _admin(pg)
    try:
        with conn.cursor() as cur:
            cur.execute(f"alter database {building} rename to {name}")
            cur.execute("select datname from pg_database where datname ~ %s and datname <> %s",
                        ("^" + re.escape(name[:-len(digest(size, shape))]) + "[0-9a-f]{10}$", name))
            for (stale,) in cur.fetchall():   # an older generator's template of this size and shape
                cur.execute(f'drop database if exists "{stale}" with (force)')
    finally:
        conn.close()
    return name, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    from benchmarks.server import start_server
    from runbooks.embedded import EmbeddedPostgresError

    parser = argparse.ArgumentParser(description="Generate (or find cached) the legacy database of a size.")
    parser.add_argument("--size", default="1M", help="tiny, 100k, 1M, 10M or ORGSxPRODUCTS (default 1M)")
    parser.add_argument("--shape", default="legacy", help="legacy, variant, unseen, or a shape and transforms joined by '+' "
                                                          "(default legacy)")
    parser.add_argument("--pg-bin", help="PostgreSQL bin directory (default: the embedded wheel's)")
    parser.add_argument("--data-dir", help="keep the server's cluster here, so the template survives the run")
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.size)
        parse_shape(args.shape)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        pg = start_server(args.pg_bin, args.data_dir)
    except EmbeddedPostgresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with runner.environment(pg.client_env()):
            name, seconds = ensure_template(pg, size, shape=args.shape)
        print(f"{name}: " + ("cached" if seconds is None else f"built in {seconds:.1f}s"))
    finally:
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
