-- 001_core_schema.sql: consolidated core tables, legacy shapes converged without losing a row, RLS and policies, constraints, indexes
-- Deploys: tables public.organizations, profiles, organization_members, products, inventory, audit_logs,
--          api_keys, security_events (their constraints, indexes, updated_at triggers, RLS policies and
--          grants); private.member_org_ids(), private.admin_org_ids(), private.owner_org_ids(),
--          private.colleague_ids() (what the policies call, arrays of uuid: for the caller, auth.uid(),
--          never another user);
--          private.append_only() (the logs' trigger);
--          work queues, empty at the end: private.pending_backfills (columns to carry, convert or fill after
--          the commit), private.backfill_stashes and private.backfill_leftovers (what the swaps need to know
--          without reading a table), private.pending_rewrites (tables to rewrite once plaintext secrets are
--          gone, or to copy with their conversions, with each rewrite's step); while a rewrite runs, its copy
--          and log in private
--          (p2_rewrite_<oid>, p2_rewrite_log_<oid>).
-- Requires: 000_core_functions.sql (checked below: the file stops at once without it).
--
-- Contents
--   1. Prerequisites and migration helpers (pg_temp: this session only)
--   2. Unique rules and ids checked, plaintext API keys hashed ahead, work queues, the tables' locks taken
--   3. The core tables, as created on an empty database
--   4. Legacy shapes converged: policies, columns, carried data, primary keys
--   5. Plaintext API keys: hashed, prefixed, redacted wherever copied, dropped
--   6. Rules: unique, foreign keys, NOT NULL and checks
--   7. Indexes adopted or dropped (missing ones are built at the end)
--   8. Policy helpers, append-only logs, updated_at triggers
--   9. Row-level security, policies and grants
--  10. Legacy triggers named, documentation in the catalog
--  11. After the commit (no transaction): redaction and backfills in batches, swaps, rewrites, indexes,
--      primary keys, rules validated, foreign keys replaced
--
-- Notes
-- * Idempotent; no transaction control in here. The runbook engine runs each statement marked as
--   no-transaction on its own: first those before the body (the checks, this session's helpers and the
--   keys hashed ahead), then the body in one transaction, then those at the end (batches, swaps, rewrites
--   and concurrent index builds on tables that may hold production data); psql -f runs it statement by
--   statement.
-- * Under the body's lock (ACCESS EXCLUSIVE on the eight core tables) no row of them is read or written,
--   whatever the legacy shape (api_keys' legacy flags excepted: a few rows per organization): the body
--   changes the catalog and plans the data work, which runs after the commit in batches of pages, each its
--   own short transaction, while the app reads and writes. What must come before anything changes (the
--   duplicates under a unique rule or in the ids) is read before it, and the plaintext keys are hashed
--   before it in batches (section 2), so that the body only drops their column.
-- * Legacy shapes are read from the catalog, not assumed. For each table the contract names, a spec
--   (pg_temp.p2_spec() below: column, type, default, NOT NULL, legacy synonyms) drives the convergence:
--   - a missing column takes a legacy synonym of the same type by rename (no rewrite), else it is added;
--   - legacy synonym columns still present are carried into it after the commit: values that convert
--     fill empty cells, values that do not convert (or that disagree with a value already there) are
--     kept in a jsonb column legacy_data under the legacy column's name; then the legacy column is dropped;
--   - a same-named column of another type is converted in place where only the catalog changes (varchar
--     to text, numeric(10,2) to numeric(12,2), a timestamp read as UTC without an index on it), else the
--     pgroll way: the contract's column is added under a hidden name (p2_new_<column>), a trigger keeps it
--     in step with what the app writes into the legacy one, the rows are converted in batches, and one
--     short transaction swaps it in (the legacy column dropped, the new one renamed, its default,
--     comment, owned sequences, policies, triggers and the contract's checks put back; a legacy index
--     on it is named in a warning with its definition). A log's columns (audit_logs, security_events) are
--     carried instead: the contract's column takes the name at once (its policy reads organization_id);
--   - key columns (ids and references) of another type stop the phase: they are not guessed at;
--   - legacy columns the contract does not name stay, without NOT NULL if they have no default.
--   Every table's primary key is id, built after the commit where it is missing (a unique index built
--   concurrently, attached once id is NOT NULL): a legacy key on other columns stays meanwhile and its
--   columns keep their uniqueness as a constraint; a legacy integer id that nothing references is kept as
--   legacy_id and the table gets uuid ids, filled in batches (but audit_logs keeps a legacy id of any
--   type). Special cases by meaning: audit_logs.changes holding {"old": ..., "new": ...} is split into
--   old_data/new_data; api_keys' active/is_active/enabled/revoked flags become revoked_at; inventory
--   without organization_id takes its product's (filled in batches).
--   The data work is planned under the lock (private.pending_backfills, and per table a trigger,
--   enabled ALWAYS, that does it for what the app writes meanwhile); after the commit the batches send
--   the rows already there through that trigger; then one short transaction per table, under lock_timeout
--   and retried, drops the legacy columns and swaps the converted ones in without reading the table (the
--   trigger saw every write since the commit, the batches every page there was). Same rules, same end
--   state as a conversion under the lock. The migration's own writes keep legacy updated_at values as
--   they were.
-- * Batches yield to replicas: between two batches, while private.replication_backlog() (phase 1) names
--   a streaming replica further behind than truthsource.max_replica_lag seconds (default 10; 0 or off:
--   never) or WAL archiving behind, the phase says 'paused: <why>' and waits, holding nothing.
-- * Plaintext API keys (api_keys.key, api_key, secret, token, ...): key_hash = sha256 hex of the key
--   (kept when newer code already wrote one), key_prefix = its first characters (at most 12, at most a
--   third of the key), computed before the lock in batches while a trigger hashes what the app writes; the
--   column is dropped under the lock. Every copy of a plaintext key in any text
--   or json column of any public table is redacted after the commit, in batches, while a trigger redacts
--   what the app writes meanwhile (the keys wait in private.redaction_keys, owner only, truncated when
--   done). The tables that held a key or a copy are then rewritten (at the end of the file, once the
--   transaction that removed the plaintext has committed: a rewrite inside it would copy the old row
--   versions) so that no dead row version keeps it; private.pending_rewrites holds the list and each
--   rewrite's step in between, so an interrupted run finishes the job when re-run. The rewrite is online
--   (pg_repack's way, in plain SQL): a copy of the table, a trigger that logs the keys of the rows the app
--   writes, the rows copied in batches of pages, the other indexes built on the copy, the log replayed in
--   batches, then one short transaction under the table's lock replays what is left of the log and puts
--   the copy in the table's place with everything the table carries (indexes, constraints, the foreign
--   keys that point at it, triggers, policies, RLS, replica identity, grants, owner, comments,
--   publications, statistics, sequences, views): its work follows what the app wrote since the last
--   batch, not the table's size. Only live rows are copied, into new files. A table with legacy columns
--   to carry (a log, typically) is carried by its copy instead of by batches before it: the rows go through
--   its backfill trigger as they are copied, their legacy columns are copied empty, and the swap's
--   transaction drops them (one pass over the table instead of two). A table with a backfill and no key
--   to remove is copied the same way when it has at least truthsource.copy_backfills_min_pages pages
--   (1024, 8 MB, by default; smaller tables are updated in batches): updating every row writes it again
--   beside its old version, with an entry in every index, where the copy writes each row once, builds
--   the indexes by sorting, and leaves no dead row behind. Where the online way cannot
--   carry a table over exactly (no key to identify rows by, an exclusion constraint, inheritance, an
--   object of another kind that depends on the table) or where truthsource.rewrite_method is 'cluster',
--   the table is rewritten by CLUSTER under its lock instead, as before: a transaction that was open before
--   the rewrite keeps old row versions alive (CLUSTER must copy what it may still see), so it waits up to
--   a minute for older transactions to end, then warns and leaves the job for a re-run
--   (verify_data_integrity() reports it as an error meanwhile); a table copied for its conversions alone
--   is never rewritten by CLUSTER: its backfills go by batches of updates instead. WAL, replicas and
--   earlier backups still hold the plaintext: rotate those keys.
-- * Rules: constraints are named after the rule they enforce. On rows already there they are added
--   NOT VALID inside the locked transaction (no scan there) and validated after its commit, one rule per
--   short transaction under SHARE UPDATE EXCLUSIVE, so the app keeps reading and writing while the rows
--   are checked; NOT NULL goes the same way (a NOT VALID check, validated, then SET NOT NULL without a
--   scan and the check dropped). The rules on a column the batches write (carried into, filled) come with
--   its swap; a legacy row a batch cannot write because it breaks a rule is left for the swap, which
--   writes it with the table's NOT VALID rules set aside for that moment (private.backfill_leftovers).
--   A foreign key whose ON DELETE (or target) changes is added beside the legacy one NOT VALID, validated,
--   then in one short transaction the legacy key goes and the contract's takes its name. Legacy rows that
--   break a rule are kept unchanged and reported by verify_data_integrity() and the preflight, while every
--   new write is checked. An UPDATE that leaves such a row still breaking its rule is refused, naming the
--   rule: fix the row in the same statement. Legacy CHECK constraints on these tables are replaced by the
--   contract's (each dropped one is named in a notice). Duplicates that a unique rule forbids stop the
--   phase before anything changes.
-- * Indexes: every foreign key is covered; an existing index that matches a planned one is renamed
--   to the planned name, one that duplicates another is dropped; missing ones are built at the end
--   with CREATE INDEX CONCURRENTLY (unique ones are then attached as constraints).
-- * RLS: every policy on these tables that the contract does not own is dropped first (an open
--   using (true) policy does not survive, whatever its name); RLS is enabled on every table in public
--   (a table the contract does not know is closed to the API roles until it gets policies of its
--   own); policies are to authenticated only and call (select auth.uid()): members read, admins and
--   owners write, viewers never write; only admins and owners read audit_logs, api_keys and
--   security_events. Organizations are created by service_role (no insert policy); an organization
--   is deleted by its owners only; a profile is read by its user and the user's colleagues and
--   written by its user only.
-- * audit_logs and security_events are append-only for every role but the table owner (no update or
--   delete policies, no UPDATE/DELETE/TRUNCATE grants to the API roles, and a trigger for the rest).
--   They have no foreign keys: the record of an action outlives the organization or user it names.
-- * Grants: anon gets nothing on these tables; authenticated gets SELECT/INSERT/UPDATE/DELETE (RLS
--   decides); service_role the same without RLS, and only SELECT/INSERT on the two logs. No API role
--   gets TRUNCATE (it bypasses RLS and the row triggers), REFERENCES or TRIGGER: the DBA truncates.

-- ====================================================================================================
-- 1. Prerequisites and migration helpers (pg_temp: this session only)
-- ====================================================================================================

-- Sections 1 and 2 up to the work queues run before the phase's transaction, each statement on its own
-- (marked no-transaction): they check, define this session's helpers and hash the keys ahead, and the
-- runner does not repeat them when it retries its transaction for a lock.

-- prerequisites: phase 1
-- runbook: no-transaction
do $$
begin
  if to_regprocedure('public.update_updated_at_column()') is null
     or to_regprocedure('public.is_org_member(uuid, uuid)') is null
     or to_regprocedure('public.validate_sku(text)') is null
     or to_regprocedure('public.validate_org_slug(text)') is null
     or to_regprocedure('private.replication_backlog()') is null
     or to_regnamespace('private') is null then
    raise exception '001_core_schema.sql requires 000_core_functions.sql: apply it first'
      using errcode = 'object_not_in_prerequisite_state';
  end if;
end
$$;

-- migration helpers for this file only (in pg_temp: they vanish with the session)
-- runbook: no-transaction
create or replace function pg_temp.p2_spec()
returns table (ord integer, tbl text, col text, typ text, dflt text, not_null boolean, is_key boolean, synonyms text[])
language sql immutable
as $fn$
  select row_number() over ()::integer, s.*
    from (values
      ('organizations', 'id', 'uuid', 'gen_random_uuid()', true, true, '{}'::text[]),
      ('organizations', 'name', 'text', null, true, false, '{org_name}'),
      ('organizations', 'slug', 'text', null, true, false, '{handle,url_slug}'),
      ('organizations', 'settings', 'jsonb', '''{}''::jsonb', true, false, '{config,preferences}'),
      ('organizations', 'created_at', 'timestamp with time zone', 'now()', true, false, '{inserted_at}'),
      ('organizations', 'updated_at', 'timestamp with time zone', 'now()', true, false, '{}'),
      ('profiles', 'id', 'uuid', null, true, true, '{}'),
      ('profiles', 'email', 'text', null, false, false, '{email_address}'),
      ('profiles', 'full_name', 'text', null, false, false, '{display_name}'),
      ('profiles', 'avatar_url', 'text', null, false, false, '{avatar,picture_url}'),
      ('profiles', 'organization_id', 'uuid', null, false, true, '{org_id,organisation_id,current_organization_id,default_organization_id}'),
      ('profiles', 'created_at', 'timestamp with time zone', 'now()', true, false, '{inserted_at}'),
      ('profiles', 'updated_at', 'timestamp with time zone', 'now()', true, false, '{}'),
      ('organization_members', 'id', 'uuid', 'gen_random_uuid()', true, true, '{}'),
      ('organization_members', 'organization_id', 'uuid', null, true, true, '{org_id,organisation_id}'),
      ('organization_members', 'user_id', 'uuid', null, true, true, '{member_id}'),
      ('organization_members', 'role', 'text', '''member''::text', true, false, '{member_role,access_level}'),
      ('organization_members', 'created_at', 'timestamp with time zone', 'now()', true, false, '{joined_at,inserted_at}'),
      ('organization_members', 'updated_at', 'timestamp with time zone', 'now()', true, false, '{}'),
      ('products', 'id', 'uuid', 'gen_random_uuid()', true, true, '{}'),
      ('products', 'organization_id', 'uuid', null, true, true, '{org_id,organisation_id}'),
      ('products', 'sku', 'text', null, true, false, '{product_code,item_code}'),
      ('products', 'name', 'text', null, true, false, '{product_name}'),
      ('products', 'description', 'text', null, false, false, '{}'),
      ('products', 'price', 'numeric(12,2)', '0', true, false, '{unit_price,list_price}'),
      ('products', 'currency', 'text', '''USD''::text', true, false, '{currency_code}'),
      ('products', 'created_at', 'timestamp with time zone', 'now()', true, false, '{inserted_at}'),
      ('products', 'updated_at', 'timestamp with time zone', 'now()', true, false, '{}'),
      ('inventory', 'id', 'uuid', 'gen_random_uuid()', true, true, '{}'),
      ('inventory', 'organization_id', 'uuid', null, true, true, '{org_id,organisation_id}'),
      ('inventory', 'product_id', 'uuid', null, true, true, '{}'),
      ('inventory', 'location', 'text', '''main''::text', true, false, '{warehouse,location_code}'),
      ('inventory', 'quantity', 'integer', '0', true, false, '{qty,on_hand,quantity_on_hand}'),
      ('inventory', 'reserved_quantity', 'integer', '0', true, false, '{reserved,qty_reserved,reserved_qty}'),
      ('inventory', 'created_at', 'timestamp with time zone', 'now()', true, false, '{inserted_at}'),
      ('inventory', 'updated_at', 'timestamp with time zone', 'now()', true, false, '{}'),
      ('audit_logs', 'id', 'any', 'gen_random_uuid()', true, true, '{}'),
      ('audit_logs', 'organization_id', 'uuid', null, false, false, '{org_id,organisation_id}'),
      ('audit_logs', 'user_id', 'uuid', null, false, false, '{actor_id,performed_by,changed_by}'),
      ('audit_logs', 'action', 'text', null, true, false, '{operation,activity}'),
      ('audit_logs', 'table_name', 'text', null, false, false, '{entity_type,resource_type,target_table}'),
      ('audit_logs', 'record_id', 'uuid', null, false, false, '{entity_id,resource_id,target_id,row_id}'),
      ('audit_logs', 'old_data', 'jsonb', null, false, false, '{old_values,previous_data}'),
      ('audit_logs', 'new_data', 'jsonb', null, false, false, '{payload,new_values}'),
      ('audit_logs', 'ip_address', 'inet', null, false, false, '{ip,ip_addr,client_ip,remote_addr}'),
      ('audit_logs', 'user_agent', 'text', null, false, false, '{}'),
      ('audit_logs', 'created_at', 'timestamp with time zone', 'now()', true, false, '{occurred_at,logged_at}'),
      ('api_keys', 'id', 'uuid', 'gen_random_uuid()', true, true, '{}'),
      ('api_keys', 'organization_id', 'uuid', null, true, true, '{org_id,organisation_id}'),
      ('api_keys', 'name', 'text', null, true, false, '{label,key_name}'),
      ('api_keys', 'key_prefix', 'text', null, true, false, '{prefix}'),
      ('api_keys', 'key_hash', 'text', null, true, false, '{}'),
      ('api_keys', 'scopes', 'text[]', '''{}''::text[]', true, false, '{permissions}'),
      ('api_keys', 'created_by', 'uuid', null, false, true, '{owner_id,creator_id}'),
      ('api_keys', 'last_used_at', 'timestamp with time zone', null, false, false, '{last_used}'),
      ('api_keys', 'expires_at', 'timestamp with time zone', null, false, false, '{expiry,valid_until}'),
      ('api_keys', 'revoked_at', 'timestamp with time zone', null, false, false, '{}'),
      ('api_keys', 'created_at', 'timestamp with time zone', 'now()', true, false, '{inserted_at}'),
      ('api_keys', 'updated_at', 'timestamp with time zone', 'now()', true, false, '{}'),
      ('security_events', 'id', 'uuid', 'gen_random_uuid()', true, true, '{}'),
      ('security_events', 'organization_id', 'uuid', null, false, false, '{org_id,organisation_id}'),
      ('security_events', 'user_id', 'uuid', null, false, false, '{actor_id}'),
      ('security_events', 'event_type', 'text', null, true, false, '{event,event_name}'),
      ('security_events', 'severity', 'text', '''low''::text', true, false, '{level}'),
      ('security_events', 'ip_address', 'inet', null, false, false, '{ip,ip_addr,client_ip}'),
      ('security_events', 'details', 'jsonb', '''{}''::jsonb', true, false, '{metadata,context}'),
      ('security_events', 'created_at', 'timestamp with time zone', 'now()', true, false, '{occurred_at}')
    ) as s (tbl, col, typ, dflt, not_null, is_key, synonyms)
$fn$;

-- the type of a column, as format_type() spells it (NULL: no such column)
-- runbook: no-transaction
create or replace function pg_temp.p2_column_type(p_rel regclass, p_col text) returns text
language sql stable
as $fn$
  select pg_catalog.format_type(a.atttypid, a.atttypmod)
    from pg_catalog.pg_attribute a
   where a.attrelid = p_rel and a.attname = p_col and a.attnum > 0 and not a.attisdropped
$fn$;

-- the contract's foreign keys (the logs have none: they outlive what they name); on_delete as pg_constraint
-- spells it: c cascade, n set null
-- runbook: no-transaction
create or replace function pg_temp.p2_foreign_keys()
returns table (tbl text, name text, col text, ref regclass, refcol text, on_delete "char")
language sql stable
as $fn$
  select x.tbl, x.name, x.col, x.ref::regclass, x.refcol, x.on_delete::"char"
    from (values
      ('profiles', 'profiles_id_fkey', 'id', 'auth.users', 'id', 'c'),
      ('profiles', 'profiles_organization_id_fkey', 'organization_id', 'public.organizations', 'id', 'n'),
      ('organization_members', 'organization_members_organization_id_fkey', 'organization_id', 'public.organizations', 'id', 'c'),
      ('organization_members', 'organization_members_user_id_fkey', 'user_id', 'auth.users', 'id', 'c'),
      ('products', 'products_organization_id_fkey', 'organization_id', 'public.organizations', 'id', 'c'),
      ('inventory', 'inventory_organization_id_fkey', 'organization_id', 'public.organizations', 'id', 'c'),
      ('inventory', 'inventory_product_id_fkey', 'product_id', 'public.products', 'id', 'c'),
      ('api_keys', 'api_keys_organization_id_fkey', 'organization_id', 'public.organizations', 'id', 'c'),
      ('api_keys', 'api_keys_created_by_fkey', 'created_by', 'auth.users', 'id', 'n')
    ) as x (tbl, name, col, ref, refcol, on_delete)
$fn$;

-- the contract's check rules, named after what they enforce, with the columns each reads
-- runbook: no-transaction
create or replace function pg_temp.p2_contract_checks() returns table (tbl text, name text, expr text, cols text[])
language sql immutable
as $fn$
  select x.tbl, x.name, x.expr, x.cols
    from (values
      ('organizations', 'organizations_slug_format_check', 'public.validate_org_slug(slug)', '{slug}'::text[]),
      ('organizations', 'organizations_name_not_blank_check', 'btrim(name) <> ''''', '{name}'),
      ('organization_members', 'organization_members_role_check', 'role in (''owner'', ''admin'', ''member'', ''viewer'')', '{role}'),
      ('products', 'products_sku_format_check', 'public.validate_sku(sku)', '{sku}'),
      ('products', 'products_name_not_blank_check', 'btrim(name) <> ''''', '{name}'),
      ('products', 'products_price_nonnegative_check', 'price >= 0', '{price}'),
      ('products', 'products_currency_format_check', 'currency ~ ''^[A-Z]{3}$''', '{currency}'),
      ('inventory', 'inventory_quantity_nonnegative_check', 'quantity >= 0', '{quantity}'),
      ('inventory', 'inventory_reserved_within_quantity_check', 'reserved_quantity >= 0 and reserved_quantity <= quantity',
       '{reserved_quantity,quantity}'),
      ('inventory', 'inventory_location_not_blank_check', 'btrim(location) <> ''''', '{location}'),
      ('audit_logs', 'audit_logs_action_not_blank_check', 'btrim(action) <> ''''', '{action}'),
      ('api_keys', 'api_keys_name_not_blank_check', 'btrim(name) <> ''''', '{name}'),
      ('api_keys', 'api_keys_key_hash_format_check', 'key_hash ~ ''^[0-9a-f]{64}$''', '{key_hash}'),
      ('api_keys', 'api_keys_key_prefix_length_check', 'length(key_prefix) between 4 and 16', '{key_prefix}'),
      ('security_events', 'security_events_severity_check', 'severity in (''low'', ''medium'', ''high'', ''critical'')', '{severity}'),
      ('security_events', 'security_events_event_type_not_blank_check', 'btrim(event_type) <> ''''', '{event_type}')
    ) as x (tbl, name, expr, cols)
$fn$;

-- What a column of the contract will hold once the legacy columns are carried, as an expression over the
-- table as it is now (its legacy synonyms in order, text compared as text): what the unique rules are
-- checked on before the locks. NULL where that cannot be told without converting every value.
-- runbook: no-transaction
create or replace function pg_temp.p2_future_value(p_table text, p_col text) returns text
language plpgsql stable
as $fn$
declare
  v_rel constant regclass := to_regclass(format('public.%I', p_table));
  s record;
  v_name text;
  v_type text;
  v_parts text[] := '{}';
begin
  select sp.* into s from pg_temp.p2_spec() as sp where sp.tbl = p_table and sp.col = p_col;
  if v_rel is null or s.col is null then
    return null;
  end if;
  foreach v_name in array array[p_col] || s.synonyms loop
    v_type := pg_temp.p2_column_type(v_rel, v_name);
    if v_type is null then
      continue;
    elsif v_type = s.typ then
      v_parts := v_parts || quote_ident(v_name);
    elsif s.typ = 'text' then
      v_parts := v_parts || format('%I::text', v_name);
    else
      return null;
    end if;
  end loop;
  return case cardinality(v_parts) when 0 then null when 1 then v_parts[1]
              else format('coalesce(%s)', array_to_string(v_parts, ', ')) end;
end
$fn$;

-- true when the table has a valid unique index on exactly these columns (nothing there can be duplicated)
-- runbook: no-transaction
create or replace function pg_temp.p2_has_unique_index(p_rel regclass, p_cols text[]) returns boolean
language sql stable
as $fn$
  select exists (
    select 1 from pg_catalog.pg_index i
     where i.indrelid = p_rel and i.indisunique and i.indisvalid and i.indpred is null and i.indexprs is null
       and array(select a.attname::text from unnest(i.indkey::smallint[]) with ordinality as k (attnum, n)
                   join pg_catalog.pg_attribute a on a.attrelid = p_rel and a.attnum = k.attnum order by k.n) = p_cols)
$fn$;

-- the migration's own writes are not business writes: user triggers (updated_at, audit) stay quiet
-- (not the migration's own p2_ triggers)
-- runbook: no-transaction
create or replace function pg_temp.p2_triggers_off(p_rel regclass) returns text[]
language plpgsql
as $fn$
declare
  v_names text[];
  v_name text;
begin
  select coalesce(array_agg(t.tgname::text order by t.tgname), '{}') into v_names
    from pg_catalog.pg_trigger t
   where t.tgrelid = p_rel and not t.tgisinternal and t.tgenabled = 'O' and t.tgname not like 'zz\_p2\_%';
  foreach v_name in array v_names loop
    execute format('alter table %s disable trigger %I', p_rel, v_name);
  end loop;
  return v_names;
end
$fn$;

-- and back on, exactly those that were on
-- runbook: no-transaction
create or replace function pg_temp.p2_triggers_on(p_rel regclass, p_names text[]) returns void
language plpgsql
as $fn$
declare
  v_name text;
begin
  foreach v_name in array p_names loop
    execute format('alter table %s enable trigger %I', p_rel, v_name);
  end loop;
end
$fn$;

-- the SQL expression converting p_x (of type p_from) to p_to; NULL where it would lose information
-- runbook: no-transaction
create or replace function pg_temp.p2_conversion(p_from text, p_to text, p_x text) returns text
language plpgsql immutable
as $fn$
begin
  if p_from = p_to then
    return p_x;
  elsif p_to = 'text' then
    return format('(%s)::text', p_x);
  elsif p_to like 'numeric%' or p_to in ('integer', 'bigint', 'smallint') then
    return format('case when ((%1$s)::%2$s)::numeric = (%1$s)::numeric then (%1$s)::%2$s end', p_x, p_to);
  elsif p_to = 'timestamp with time zone' and p_from = 'timestamp without time zone' then
    return format('((%s) at time zone ''UTC'')', p_x);
  elsif p_to = 'text[]' and p_from in ('jsonb', 'json') then
    return format('case when jsonb_typeof((%1$s)::jsonb) = ''array'' then array(select jsonb_array_elements_text((%1$s)::jsonb)) end', p_x);
  elsif p_to = 'text[]' and p_from not like '%[]' then
    return format('case when (%1$s)::text ~ ''^\{.*\}$'' then (%1$s)::text::text[] else array(select btrim(e) from unnest(string_to_array((%1$s)::text, '','')) as e where btrim(e) <> '''') end', p_x);
  elsif p_to = 'jsonb' and p_from not in ('json', 'text') and p_from not like 'character%' then
    return format('to_jsonb(%s)', p_x);
  end if;
  return format('(%s)::%s', p_x, p_to);
end
$fn$;

-- keep the values of a legacy column that match p_where in legacy_data, under p_key (api_keys' flags: a
-- table of a few rows per organization, converted under the lock with its plaintext keys)
-- runbook: no-transaction
create or replace function pg_temp.p2_stash(p_rel regclass, p_key text, p_source text, p_where text) returns void
language plpgsql
as $fn$
declare
  v_count bigint;
begin
  execute format('select count(*) from %s where %s', p_rel, p_where) into v_count;
  if v_count = 0 then
    return;
  end if;
  if pg_temp.p2_column_type(p_rel, 'legacy_data') is null then
    execute format('alter table %s add column legacy_data jsonb', p_rel);
    execute format('comment on column %s.legacy_data is %L', p_rel,
      'Values of retired legacy columns that could not be converted, keyed by the legacy column name (001_core_schema.sql).');
  end if;
  execute format('update %s set legacy_data = coalesce(legacy_data, ''{}''::jsonb) || jsonb_build_object(%L, to_jsonb(%I)) where %s',
                 p_rel, p_key, p_source, p_where);
  insert into private.backfill_stashes (table_name)
  select format('%I.%I', n.nspname, c.relname) from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
   where c.oid = p_rel
  on conflict do nothing;
  raise notice '%: % value(s) of legacy column % kept in legacy_data', p_rel, v_count, p_key;
end
$fn$;

-- Every data change a legacy shape needs is planned here (a row of private.pending_backfills) and done
-- after the commit, in batches of pages (section 11), never under the lock:
--   carry    a legacy column into the contract's (values that convert fill empty cells, the others are
--            kept in legacy_data), then the legacy column is dropped;
--   split    audit_logs.changes {"old": ..., "new": ...} into old_data/new_data, the same way;
--   convert  a same-named column whose type must change with a read or a rewrite: the contract's column
--            is added under a hidden name (p2_new_<column>) and kept in step with the legacy one, then
--            swapped in, in one short transaction (the pgroll way);
--   fill     a column added without values (a new uuid id, inventory.organization_id) filled from an
--            expression over the row.
-- A row trigger (pg_temp.p2_backfill_trigger) does the work for the rows the app writes meanwhile, and
-- the batches send the rows already there through it (one definition of each change). The table gets a
-- p2_carried marker (and legacy_data where something may not convert) until the swap drops them.
-- runbook: no-transaction
create or replace function pg_temp.p2_plan_backfill(p_rel regclass, p_kind text, p_target text, p_source text, p_stash_key text,
                                                     p_dflt text default null, p_fill text default null)
returns void
language plpgsql
as $fn$
declare
  v_added boolean := false;
begin
  if p_kind <> 'fill' and pg_temp.p2_column_type(p_rel, 'legacy_data') is null then
    execute format('alter table %s add column legacy_data jsonb', p_rel);
    execute format('comment on column %s.legacy_data is %L', p_rel,
      'Values of retired legacy columns that could not be converted, keyed by the legacy column name (001_core_schema.sql).');
    v_added := true;
  end if;
  if pg_temp.p2_column_type(p_rel, 'p2_carried') is null then
    execute format('alter table %s add column p2_carried boolean', p_rel);
  end if;
  insert into private.pending_backfills (table_name, kind, target, source, stash_key, from_type, to_type, legacy_data_added,
                                         dflt, fill_expr)
  values ((select format('%I.%I', n.nspname, c.relname) from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
           where c.oid = p_rel), p_kind, p_target, p_source, p_stash_key, pg_temp.p2_column_type(p_rel, p_source),
          pg_temp.p2_column_type(p_rel, p_target), v_added, p_dflt, p_fill)
  on conflict (table_name, source) do update set legacy_data_added = private.pending_backfills.legacy_data_added or excluded.legacy_data_added,
                                                 dflt = coalesce(excluded.dflt, private.pending_backfills.dflt);
  raise notice '%: %', p_rel, case p_kind
    when 'convert' then format('column %s (%s) is converted to %s after the commit, in batches, then swapped in', p_source,
                               pg_temp.p2_column_type(p_rel, p_source), pg_temp.p2_column_type(p_rel, p_target))
    when 'fill' then format('column %s is filled after the commit, in batches', p_target)
    else format('legacy column %s is carried into %s after the commit, in batches, then dropped', p_source, p_target) end;
end
$fn$;

-- carry legacy column p_source into p_target (a column of the contract, or the hidden column a conversion
-- of it fills): planned here, done after the commit
-- runbook: no-transaction
create or replace function pg_temp.p2_carry(p_rel regclass, p_target text, p_source text, p_stash_key text) returns void
language plpgsql
as $fn$
declare
  v_into constant text := coalesce((select b.target from private.pending_backfills as b
                                     where b.table_name::regclass = p_rel and b.kind = 'convert' and b.source = p_target), p_target);
begin
  perform pg_temp.p2_plan_backfill(p_rel, 'carry', v_into, p_source, p_stash_key);
end
$fn$;

-- what would be lost with a column whose type must change: a view or rule reading it, a generated column
-- computed from it, or a foreign key of another table that references it stop the phase (named); the
-- column's own default, constraints, indexes, statistics, policies and triggers follow it (section 11)
-- runbook: no-transaction
create or replace function pg_temp.p2_column_dependents(p_rel regclass, p_col text) returns text
language sql stable
as $fn$
  select string_agg(distinct case when d.classid = 'pg_catalog.pg_rewrite'::regclass
                                  then pg_catalog.pg_describe_object('pg_catalog.pg_class'::regclass,
                                                                     (select w.ev_class from pg_catalog.pg_rewrite w where w.oid = d.objid), 0)
                                  else pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid) end, ', ')
    from pg_catalog.pg_attribute a
    join pg_catalog.pg_depend d on d.refclassid = 'pg_catalog.pg_class'::regclass and d.refobjid = a.attrelid and d.refobjsubid = a.attnum
   where a.attrelid = p_rel and a.attname = p_col and d.deptype in ('n', 'a')
     and not (d.classid in ('pg_catalog.pg_policy'::regclass, 'pg_catalog.pg_trigger'::regclass, 'pg_catalog.pg_statistic_ext'::regclass))
     and not (d.classid = 'pg_catalog.pg_constraint'::regclass
              and (select c.conrelid = p_rel and c.confrelid is distinct from p_rel from pg_catalog.pg_constraint as c where c.oid = d.objid))
     and not (d.classid = 'pg_catalog.pg_class'::regclass
              and (select c.relkind in ('i', 'I', 'S') from pg_catalog.pg_class as c where c.oid = d.objid))
     and not (d.classid = 'pg_catalog.pg_attrdef'::regclass
              and (select ad.adnum = a.attnum from pg_catalog.pg_attrdef as ad where ad.oid = d.objid))
$fn$;

-- true when every value of type p_from is a value of p_to as it stands (varchar to text, numeric(10,2)
-- to numeric(12,2), integer to bigint): such a column converts without reading a row
-- runbook: no-transaction
create or replace function pg_temp.p2_widens(p_from text, p_to text) returns boolean
language sql immutable
as $fn$
  -- a length, precision or scale that does not parse is NULL: not known to widen
  select coalesce(case
    when p_from like 'character varying%' then p_to = 'text'
      or substring(p_to from '^character varying\((\d+)\)$')::int >= substring(p_from from '^character varying\((\d+)\)$')::int
    when p_from ~ '^numeric\(\d+,\d+\)$' then p_to = 'numeric'
      or (substring(p_to from '^numeric\(\d+,(\d+)\)$') = substring(p_from from ',(\d+)\)$')
          and substring(p_to from '^numeric\((\d+),')::int >= substring(p_from from '^numeric\((\d+),')::int)
    when p_from = 'smallint' then p_to in ('integer', 'bigint', 'numeric')
    when p_from = 'integer' then p_to in ('bigint', 'numeric')
  end, false)
$fn$;

-- true when ALTER COLUMN TYPE changes only the catalog: a widening that keeps the stored bytes (varchar to
-- text, a longer varchar, a wider numeric; not integer to bigint, which rewrites every row), or a
-- timestamp read as UTC where no index must be rebuilt (the body runs with TimeZone UTC)
-- runbook: no-transaction
create or replace function pg_temp.p2_alters_in_place(p_rel regclass, p_col text, p_from text, p_to text) returns boolean
language sql stable
as $fn$
  select (pg_temp.p2_widens(p_from, p_to) and p_from not in ('smallint', 'integer'))
      or (p_from = 'timestamp without time zone' and p_to = 'timestamp with time zone'
          and current_setting('TimeZone') = 'UTC'
          and not exists (select 1 from pg_catalog.pg_index i join pg_catalog.pg_attribute a on a.attrelid = i.indrelid
                           where i.indrelid = p_rel and a.attname = p_col
                             and (a.attnum = any (i.indkey::smallint[]) or i.indexprs is not null or i.indpred is not null)))
$fn$;

-- convert a column: in place where the catalog alone changes (a CHECK on it would be re-validated by a scan:
-- it goes first, and section 6 adds the contract's again NOT VALID), else planned as an online conversion
-- runbook: no-transaction
create or replace function pg_temp.p2_convert(p_rel regclass, p_col text, p_from text, p_to text, p_dflt text) returns void
language plpgsql
as $fn$
declare
  v_hidden constant text := left('p2_new_' || p_col, 63);
  v_blockers text;
  v_legacy text;
  r record;
begin
  v_blockers := pg_temp.p2_column_dependents(p_rel, p_col);
  if v_blockers is not null then
    raise exception '%.% is % but the contract needs %, and % depend(s) on it', p_rel, p_col, p_from, p_to, v_blockers
      using errcode = 'dependent_objects_still_exist',
            hint = 'Drop those objects (re-create them after this phase), then re-run this file: its transaction changed nothing.';
  end if;
  if pg_temp.p2_alters_in_place(p_rel, p_col, p_from, p_to) then
    for r in
      select c.conname, pg_catalog.pg_get_constraintdef(c.oid) as def
        from pg_catalog.pg_constraint c join pg_catalog.pg_attribute a on a.attrelid = c.conrelid and a.attnum = any (c.conkey)
       where c.conrelid = p_rel and c.contype = 'c' and a.attname = p_col
       order by 1
    loop
      execute format('alter table %s drop constraint %I', p_rel, r.conname);
      raise notice 'legacy check % on % (%) dropped: the contract''s rules replace it', quote_ident(r.conname), p_rel, r.def;
    end loop;
    execute format('alter table %s alter column %I drop default', p_rel, p_col);
    execute format('alter table %s alter column %I type %s', p_rel, p_col, p_to);
    raise notice '%: column % converted from % to %', p_rel, p_col, p_from, p_to;
    return;
  end if;
  if p_rel in ('public.audit_logs'::regclass, 'public.security_events'::regclass) then
    -- a log is written, hardly read, and its policies read organization_id: the contract's column takes the
    -- name now and the legacy values are carried into it (rows not carried yet read NULL meanwhile)
    v_legacy := p_col || '_legacy';
    while pg_temp.p2_column_type(p_rel, v_legacy) is not null loop
      v_legacy := v_legacy || '_';
    end loop;
    execute format('alter table %s rename column %I to %I', p_rel, p_col, v_legacy);
    execute format('alter table %s alter column %I drop default', p_rel, v_legacy);
    execute format('alter table %s add column %I %s', p_rel, p_col, p_to);
    perform pg_temp.p2_carry(p_rel, p_col, v_legacy, p_col);
    return;
  end if;
  if pg_temp.p2_column_type(p_rel, v_hidden) is null then
    execute format('alter table %s add column %I %s', p_rel, v_hidden, p_to);
  end if;
  perform pg_temp.p2_plan_backfill(p_rel, 'convert', v_hidden, p_col, p_col, p_dflt);
end
$fn$;

-- The planned backfills of one table as a row trigger (private.p2_backfill_<table>, enabled ALWAYS so that
-- a session in replica mode is no exception): every row the app writes until the swap goes through it, and
-- the batches of section 11 send the rows already there through it. Per row, as a locked transaction would
-- do per table: a value that disagrees with one already in the target, or that does not convert, is kept in
-- legacy_data (and the table named in private.backfill_stashes, so that the swap knows without a scan
-- whether legacy_data holds anything). Security definer: the app's roles write neither private table.
-- runbook: no-transaction
create or replace function pg_temp.p2_backfill_trigger(p_rel regclass) returns void
language plpgsql
as $fn$
declare
  j record;
  v_body text := '';
  v_relname constant text := (select c.relname from pg_catalog.pg_class c where c.oid = p_rel);
  v_function constant text := format('private.%I', 'p2_backfill_' || v_relname);
  v_stash constant text := 'new.legacy_data := coalesce(new.legacy_data, ''{}''::jsonb) || jsonb_build_object(%L, to_jsonb(new.%I)); v_stashed := true;';
  v_fits constant text := 'jsonb_typeof(new.%1$I) = ''object'' and new.%1$I <> ''{}''::jsonb and (new.%1$I - ''old'' - ''new'') = ''{}''::jsonb';
  v_fresh constant text := '(tg_op = ''INSERT'' or old.p2_carried is not true or new.%1$I::text is distinct from old.%1$I::text)';
begin
  for j in select b.* from private.pending_backfills as b where b.table_name::regclass = p_rel order by b.ord loop
    if j.kind = 'fill' then
      v_body := v_body || format($b$
  if new.%1$s is null then
    new.%1$s := %2$s;
  end if;$b$, quote_ident(j.target), j.fill_expr);
    elsif j.kind = 'convert' then
      -- the hidden column follows the legacy one: what the app writes there, converted
      v_body := v_body || format($b$
  if %5$s then
    new.%1$s := null;
    if new.%2$s is not null then
      begin
        new.%1$s := %3$s;
      exception when others then
        new.%1$s := null;
      end;
      if new.%1$s is null then
        %4$s
      elsif tg_op = 'UPDATE' and new.legacy_data -> %6$s = to_jsonb(old.%2$s) then
        new.legacy_data := nullif(new.legacy_data - %6$s, '{}'::jsonb);
      end if;
    end if;
  end if;$b$, quote_ident(j.target), quote_ident(j.source), pg_temp.p2_conversion(j.from_type, j.to_type, format('new.%I', j.source)),
        format(v_stash, j.stash_key, j.source), format(v_fresh, j.source), quote_literal(j.stash_key));
    elsif j.kind = 'carry' then
      -- a row carried before whose legacy value the app alone changed since: that value is carried
      v_body := v_body || format($b$
  if new.%2$s is not null and %5$s then
    if tg_op = 'UPDATE' and old.p2_carried is true and new.%1$s::text is not distinct from old.%1$s::text then
      new.%1$s := null;
    end if;
    if new.%1$s is not null and new.%1$s::text is distinct from new.%2$s::text then
      %4$s
    elsif new.%1$s is null then
      begin
        new.%1$s := %3$s;
      exception when others then
        new.%1$s := null;
      end;
      if new.%1$s is null then
        %4$s
      end if;
    end if;
  end if;$b$, quote_ident(j.target), quote_ident(j.source), pg_temp.p2_conversion(j.from_type, j.to_type, format('new.%I', j.source)),
        format(v_stash, j.stash_key, j.source), format(v_fresh, j.source));
    else
      v_body := v_body || format($b$
  if new.%1$s is not null and %4$s then
    if %2$s then
      if not ((new.old_data is null or new.old_data = nullif(new.%1$s -> 'old', 'null'::jsonb))
              and (new.new_data is null or new.new_data = nullif(new.%1$s -> 'new', 'null'::jsonb))) then
        %3$s
      end if;
      new.old_data := coalesce(new.old_data, nullif(new.%1$s -> 'old', 'null'::jsonb));
      new.new_data := coalesce(new.new_data, nullif(new.%1$s -> 'new', 'null'::jsonb));
    else
      if new.new_data is not null and new.new_data <> new.%1$s then
        %3$s
      end if;
      new.new_data := coalesce(new.new_data, new.%1$s);
    end if;
  end if;$b$, quote_ident(j.source), format(v_fits, j.source), format(v_stash, j.stash_key, j.source), format(v_fresh, j.source));
    end if;
  end loop;
  if v_body = '' then
    return;
  end if;
  -- the migration's own batches (truthsource.migration_write on) leave updated_at as it was: this trigger
  -- fires after the table's updated_at trigger (name order)
  if pg_temp.p2_column_type(p_rel, 'updated_at') is not null then
    v_body := v_body || $b$
  if tg_op = 'UPDATE' and current_setting('truthsource.migration_write', true) = 'on' then
    new.updated_at := old.updated_at;
  end if;$b$;
  end if;
  execute format($f$create or replace function %1$s() returns trigger
language plpgsql
security definer
set search_path = ''
set "TimeZone" = 'UTC'
as $body$
declare
  v_stashed boolean := false;
begin%2$s
  new.p2_carried := true;
  if v_stashed then
    insert into private.backfill_stashes (table_name) values (format('%%I.%%I', tg_table_schema, tg_table_name)) on conflict do nothing;
  end if;
  return new;
end
$body$$f$, v_function, v_body);
  execute format('revoke all on function %s() from public, anon, authenticated, service_role', v_function);
  execute format('comment on function %s() is %L', v_function,
    'Carries, converts and fills the legacy shape of this table into the contract''s until 001_core_schema.sql swaps it in (then it goes too).');
  execute format('drop trigger if exists zz_p2_backfill on %s', p_rel);
  execute format('create trigger zz_p2_backfill before insert or update on %s for each row execute function %s()', p_rel, v_function);
  execute format('alter table %s enable always trigger zz_p2_backfill', p_rel);
end
$fn$;

-- converge one table to the spec; returns the columns it added
-- runbook: no-transaction
create or replace function pg_temp.p2_converge_table(p_table text) returns text[]
language plpgsql
as $fn$
declare
  v_rel constant regclass := format('public.%I', p_table)::regclass;
  s record;
  v_type text;
  v_legacy text;
  v_syn text;
  v_present text[];
  v_added text[] := '{}';
begin
  for s in select sp.* from pg_temp.p2_spec() as sp where sp.tbl = p_table order by sp.ord loop
    v_type := pg_temp.p2_column_type(v_rel, s.col);
    -- a same-named column of another type
    if v_type is not null and s.typ <> 'any' and v_type <> s.typ then
      if s.is_key and s.col = 'id' and v_type in ('bigint', 'integer', 'smallint')
         and not exists (select 1 from pg_catalog.pg_constraint as c where c.confrelid = v_rel and c.contype = 'f') then
        -- a numeric id that nothing references: kept as legacy_id, the table gets uuid ids (filled after
        -- the commit: a volatile default here would rewrite the table)
        v_legacy := 'legacy_id';
        while pg_temp.p2_column_type(v_rel, v_legacy) is not null loop
          v_legacy := v_legacy || '_';
        end loop;
        execute format('alter table %s rename column id to %I', v_rel, v_legacy);
        execute format('alter table %s alter column %I drop default', v_rel, v_legacy);
        for v_syn in select c.conname from pg_catalog.pg_constraint as c where c.conrelid = v_rel and c.contype = 'p' loop
          execute format('alter table %s drop constraint %I', v_rel, v_syn);
        end loop;
        execute format('alter table %s add column id uuid', v_rel);
        execute format('alter table %s alter column id set default gen_random_uuid()', v_rel);
        perform pg_temp.p2_plan_backfill(v_rel, 'fill', 'id', 'id', 'id', null, 'gen_random_uuid()');
        raise notice '%: legacy % id kept as %; the table now has uuid ids', v_rel, v_type, v_legacy;
      elsif s.is_key then
        raise exception '%.% is % but the contract needs %: key columns are not converted automatically', v_rel, s.col, v_type, s.typ
          using errcode = 'datatype_mismatch',
                hint = 'Convert the column and the columns that reference it by hand, then re-run this file.';
      else
        perform pg_temp.p2_convert(v_rel, s.col, v_type, s.typ, s.dflt);
      end if;
    end if;
    -- a missing column: a legacy synonym of the same type is renamed, else the column is added
    if pg_temp.p2_column_type(v_rel, s.col) is null then
      select x.syn into v_syn
        from unnest(s.synonyms) with ordinality as x (syn, n)
       where pg_temp.p2_column_type(v_rel, x.syn) = s.typ
          or (s.typ = 'any' and pg_temp.p2_column_type(v_rel, x.syn) is not null)
       order by x.n
       limit 1;
      if v_syn is not null then
        execute format('alter table %s rename column %I to %I', v_rel, v_syn, s.col);
        raise notice '%: legacy column % renamed to %', v_rel, v_syn, s.col;
      else
        v_present := array(select x from unnest(s.synonyms) as x where pg_temp.p2_column_type(v_rel, x) is not null);
        v_type := case when s.typ = 'any' then 'uuid' else s.typ end;
        if cardinality(v_present) = 0 and s.dflt like '%gen_random_uuid()%' then
          -- a volatile default would be computed for every row here, a rewrite: filled after the commit
          execute format('alter table %s add column %I %s', v_rel, s.col, v_type);
          execute format('alter table %s alter column %I set default %s', v_rel, s.col, s.dflt);
          perform pg_temp.p2_plan_backfill(v_rel, 'fill', s.col, s.col, s.col, null, s.dflt);
        elsif cardinality(v_present) = 0 and s.dflt is not null then
          -- nothing to carry: existing rows take the default (a fast default: no row is written)
          execute format('alter table %s add column %I %s default %s', v_rel, s.col, v_type, s.dflt);
        else
          -- legacy values are carried after the commit; a row without one stays NULL (and is reported)
          -- rather than invent one
          execute format('alter table %s add column %I %s', v_rel, s.col, v_type);
        end if;
        v_added := v_added || s.col;
        raise notice '%: column % % added', v_rel, s.col, v_type;
      end if;
    end if;
    -- legacy synonyms still present: carried into the column after the commit, then dropped
    foreach v_syn in array s.synonyms loop
      if pg_temp.p2_column_type(v_rel, v_syn) is not null then
        perform pg_temp.p2_carry(v_rel, s.col, v_syn, v_syn);
      end if;
    end loop;
    -- the contract's default (a column of free type keeps its own unless added here); where the column is
    -- still carried into or converted, the swap sets it (a default now would win over the legacy values)
    v_legacy := case when s.dflt is not null and (s.typ <> 'any' or s.col = any (v_added)) then s.dflt end;
    if exists (select 1 from private.pending_backfills as b
                where b.table_name::regclass = v_rel and b.kind = 'carry' and b.target = s.col) then
      -- a default in the target would be taken for the app's own value: the swap sets it
      select coalesce(v_legacy, pg_catalog.pg_get_expr(d.adbin, d.adrelid)) into v_legacy
        from pg_catalog.pg_attribute a left join pg_catalog.pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
       where a.attrelid = v_rel and a.attname = s.col;
      execute format('alter table %s alter column %I drop default', v_rel, s.col);
      update private.pending_backfills as b set dflt = v_legacy
       where b.table_name::regclass = v_rel and b.kind = 'carry' and b.target = s.col;
    elsif v_legacy is not null and not exists (select 1 from private.pending_backfills as b
                                                where b.table_name::regclass = v_rel and b.kind = 'convert' and b.source = s.col) then
      execute format('alter table %s alter column %I set default %s', v_rel, s.col, v_legacy);
    end if;
  end loop;
  -- legacy columns the contract does not name stay, but must not block the contract's writes
  for v_syn in
    select a.attname
      from pg_catalog.pg_attribute a
     where a.attrelid = v_rel and a.attnum > 0 and not a.attisdropped and a.attnotnull
       and a.attname <> all (array(select sp.col from pg_temp.p2_spec() as sp where sp.tbl = p_table))
       and not a.atthasdef
       and not exists (select 1 from pg_catalog.pg_constraint c
                        where c.conrelid = v_rel and c.contype = 'p' and a.attnum = any (c.conkey))
     order by a.attnum
  loop
    execute format('alter table %s alter column %I drop not null', v_rel, v_syn);
    raise notice '%: legacy column % kept, no longer NOT NULL', v_rel, v_syn;
  end loop;
  return v_added;
end
$fn$;

-- column names of an attribute number vector
-- runbook: no-transaction
create or replace function pg_temp.p2_column_names(p_rel regclass, p_attnums smallint[]) returns text[]
language sql stable
as $fn$
  select array(select a.attname::text
                 from unnest(p_attnums) with ordinality as k (attnum, n)
                 join pg_catalog.pg_attribute a on a.attrelid = p_rel and a.attnum = k.attnum
                order by k.n)
$fn$;

-- the name a legacy primary key on other columns takes while the one on id is built (section 11 drops it)
-- runbook: no-transaction
create or replace function pg_temp.p2_legacy_pkey(p_table text) returns text
language sql immutable
as $fn$
  select left(p_table, 48) || '_p2_legacy_pkey'
$fn$;

-- The primary key is on id, named <table>_pkey. A table without one gets it after the commit: its unique
-- index is built concurrently, id becomes NOT NULL through a validated check, and the index is attached
-- (section 11); NULL or duplicated ids stop the phase before the locks (section 2). A legacy key on other
-- columns stays meanwhile, renamed, and its columns keep their uniqueness as a constraint: where they are a
-- unique rule of the contract, its index is built concurrently too; otherwise it is built here (a legacy
-- shape this phase does not expect: the only index built under the lock).
-- runbook: no-transaction
create or replace function pg_temp.p2_ensure_pk(p_table text) returns void
language plpgsql
as $fn$
declare
  v_rel constant regclass := format('public.%I', p_table)::regclass;
  v_name constant text := p_table || '_pkey';
  v_current text;
  v_columns text[];
  v_unique text;
begin
  select c.conname, pg_temp.p2_column_names(v_rel, c.conkey) into v_current, v_columns
    from pg_catalog.pg_constraint c where c.conrelid = v_rel and c.contype = 'p';
  if v_columns = array['id'] then
    if v_current <> v_name then
      execute format('alter table %s rename constraint %I to %I', v_rel, v_current, v_name);
      raise notice '%: primary key % renamed to %', v_rel, v_current, v_name;
    end if;
    return;
  end if;
  if v_current is not null and v_current <> pg_temp.p2_legacy_pkey(p_table) then
    v_unique := left(format('%s_%s_key', p_table, array_to_string(v_columns, '_')), 63);
    if v_unique not in ('organizations_slug_key', 'organization_members_organization_id_user_id_key',
                        'products_organization_id_sku_key', 'inventory_product_id_location_key', 'api_keys_key_hash_key')
       and not exists (select 1 from pg_catalog.pg_constraint c where c.conrelid = v_rel and c.conname = v_unique) then
      execute format('alter table %s add constraint %I unique (%s)', v_rel, v_unique,
                     (select string_agg(quote_ident(x), ', ') from unnest(v_columns) as x));
    end if;
    execute format('alter table %s rename constraint %I to %I', v_rel, v_current, pg_temp.p2_legacy_pkey(p_table));
    raise notice '%: primary key % on (%) is replaced after the commit: (%) stay unique as %', v_rel, v_current,
      array_to_string(v_columns, ', '), array_to_string(v_columns, ', '), v_unique;
  end if;
  raise notice '%: primary key % on id is built concurrently at the end of this file', v_rel, v_name;
end
$fn$;

-- a unique rule: adopt an equivalent constraint or index, else it is built concurrently at the end (its
-- rows were checked before the locks, section 2: nothing is read here)
-- runbook: no-transaction
create or replace function pg_temp.p2_ensure_unique(p_table text, p_name text, p_cols text[]) returns void
language plpgsql
as $fn$
declare
  v_rel constant regclass := format('public.%I', p_table)::regclass;
  r record;
begin
  for r in
    select c.conname, c.contype, pg_temp.p2_column_names(v_rel, c.conkey) as cols
      from pg_catalog.pg_constraint c
     where c.conrelid = v_rel and c.conname = p_name
  loop
    if r.contype = 'u' and r.cols = p_cols then
      return;
    end if;
    execute format('alter table %s drop constraint %I', v_rel, p_name);
    raise notice '%: constraint % did not enforce unique (%): dropped', v_rel, p_name, array_to_string(p_cols, ', ');
  end loop;
  -- an index of that name that is not the rule (or a leftover of an interrupted build) goes
  for r in
    select ic.relname from pg_catalog.pg_index i join pg_catalog.pg_class ic on ic.oid = i.indexrelid
     where i.indrelid = v_rel and ic.relname = p_name
       and not (i.indisunique and i.indisvalid and i.indpred is null and i.indexprs is null
                and pg_temp.p2_column_names(v_rel, i.indkey::smallint[]) = p_cols)
  loop
    execute format('drop index public.%I', r.relname);
    raise notice '%: index % was not a valid unique index on (%): dropped', v_rel, r.relname, array_to_string(p_cols, ', ');
  end loop;
  for r in
    select ic.relname, c.conname, c.contype
      from pg_catalog.pg_index i
      join pg_catalog.pg_class ic on ic.oid = i.indexrelid
      left join pg_catalog.pg_constraint c on c.conindid = i.indexrelid and c.conrelid = v_rel
     where i.indrelid = v_rel and i.indisunique and i.indisvalid and i.indpred is null and i.indexprs is null
       and pg_temp.p2_column_names(v_rel, i.indkey::smallint[]) = p_cols
       and c.conname is distinct from pg_temp.p2_legacy_pkey(p_table)
     order by c.contype nulls last, ic.relname
  loop
    if r.contype = 'p' then
      return;
    elsif r.contype = 'u' then
      execute format('alter table %s rename constraint %I to %I', v_rel, r.conname, p_name);
      raise notice '%: unique constraint % renamed to %', v_rel, r.conname, p_name;
      return;
    elsif r.contype is null then
      execute format('alter table %s add constraint %I unique using index %I', v_rel, p_name, r.relname);
      raise notice '%: unique index % adopted as constraint %', v_rel, r.relname, p_name;
      return;
    end if;
  end loop;
  raise notice '%: % (unique %) is built concurrently at the end of this file', v_rel, p_name, array_to_string(p_cols, ', ');
end
$fn$;

-- the name the contract's foreign key takes while a legacy one of its name is still there
-- runbook: no-transaction
create or replace function pg_temp.p2_fk_pending_name(p_name text) returns text
language sql immutable
as $fn$
  select left(p_name, 55) || '_p2_new'
$fn$;

-- A foreign key: adopt an equivalent one (the others on the column go), else add the contract's NOT VALID.
-- Where a legacy key on the column says something else (another ON DELETE, another table), it stays until
-- the contract's is validated after the commit, then goes and the contract's takes its name (section 11):
-- the rows are never without a validated key. A key to a table whose primary key is still to be built is
-- added after it is (section 11).
-- runbook: no-transaction
create or replace function pg_temp.p2_ensure_fk(p_table text, p_name text, p_col text, p_ref regclass, p_refcol text, p_on_delete "char")
returns void
language plpgsql
as $fn$
declare
  v_rel constant regclass := format('public.%I', p_table)::regclass;
  v_pending constant text := pg_temp.p2_fk_pending_name(p_name);
  v_att smallint;
  v_refatt smallint;
  v_same text;
  v_named_other boolean;
  r record;
begin
  select a.attnum into v_att from pg_catalog.pg_attribute a where a.attrelid = v_rel and a.attname = p_col and not a.attisdropped;
  select a.attnum into v_refatt from pg_catalog.pg_attribute a where a.attrelid = p_ref and a.attname = p_refcol and not a.attisdropped;
  select c.conname into v_same
    from pg_catalog.pg_constraint c
   where c.conrelid = v_rel and c.contype = 'f' and c.conkey = array[v_att]
     and c.confrelid = p_ref and c.confkey = array[v_refatt] and c.confdeltype = p_on_delete and c.confupdtype = 'a'
     and c.confmatchtype = 's' and not c.condeferrable
   order by c.conname = p_name desc, c.conname = v_pending desc, c.conname
   limit 1;
  v_named_other := exists (select 1 from pg_catalog.pg_constraint c
                            where c.conrelid = v_rel and c.conname = p_name and c.conname is distinct from v_same);
  if v_same is null and not pg_temp.p2_has_unique_index(p_ref, array[p_refcol]) then
    raise notice '%: foreign key % is added once the primary key of % is built, at the end of this file', v_rel, p_name, p_ref;
    return;
  end if;
  -- other keys on the column go, but a legacy one of the contract's name waits for the contract's to be validated
  for r in
    select c.conname from pg_catalog.pg_constraint c
     where c.conrelid = v_rel and c.contype = 'f' and c.conkey = array[v_att]
       and c.conname is distinct from v_same and c.conname <> p_name
     order by 1
  loop
    execute format('alter table %s drop constraint %I', v_rel, r.conname);
    raise notice '%: foreign key % dropped: the contract''s % references %(%) on delete %', v_rel, r.conname, p_name, p_ref, p_refcol,
      case p_on_delete when 'c' then 'cascade' when 'n' then 'set null' else 'no action' end;
  end loop;
  if v_same is null then
    execute format('alter table %s add constraint %I foreign key (%I) references %s (%I) on delete %s not valid',
                   v_rel, case when v_named_other then v_pending else p_name end, p_col, p_ref, p_refcol,
                   case p_on_delete when 'c' then 'cascade' when 'n' then 'set null' else 'no action' end);
    if v_named_other then
      raise notice '%: foreign key % is replaced by the contract''s (on delete %) once that is validated, at the end of this file',
        v_rel, p_name, case p_on_delete when 'c' then 'cascade' when 'n' then 'set null' else 'no action' end;
    end if;
  elsif v_same <> p_name and not v_named_other then
    execute format('alter table %s rename constraint %I to %I', v_rel, v_same, p_name);
    raise notice '%: foreign key % renamed to %', v_rel, v_same, p_name;
  end if;
  -- a NOT VALID key is validated after the commit (section 11), where the app keeps writing
end
$fn$;

-- a check rule: replace a same-named one that says something else, else add it NOT VALID
-- runbook: no-transaction
create or replace function pg_temp.p2_ensure_check(p_table text, p_name text, p_expr text) returns void
language plpgsql
as $fn$
declare
  v_rel constant regclass := format('public.%I', p_table)::regclass;
  v_have text;
  v_want text;
begin
  select pg_catalog.pg_get_constraintdef(c.oid) into v_have
    from pg_catalog.pg_constraint c where c.conrelid = v_rel and c.conname = p_name;
  if v_have is not null then
    execute format('alter table %s add constraint p2_scratch_check check (%s) not valid', v_rel, p_expr);
    select pg_catalog.pg_get_constraintdef(c.oid) into v_want
      from pg_catalog.pg_constraint c where c.conrelid = v_rel and c.conname = 'p2_scratch_check';
    execute format('alter table %s drop constraint p2_scratch_check', v_rel);
    if regexp_replace(v_have, ' NOT VALID$', '') <> regexp_replace(v_want, ' NOT VALID$', '') then
      execute format('alter table %s drop constraint %I', v_rel, p_name);
      raise notice '%: constraint % said %: replaced by the contract''s rule', v_rel, p_name, v_have;
      v_have := null;
    end if;
  end if;
  -- instant under the lock: new writes are checked from the commit on; the rows already there are
  -- validated after the commit (section 11), where the app keeps reading and writing
  if v_have is null then
    execute format('alter table %s add constraint %I check (%s) not valid', v_rel, p_name, p_expr);
  end if;
end
$fn$;

-- NOT NULL, online: a NOT VALID check <table>_<column>_not_null_check now (no scan under the lock); after
-- the commit (section 11) a check that holds is validated and the column becomes NOT NULL without a scan
-- (the validated check proves it), then the check goes. Where a legacy row is null the check stays NOT VALID.
-- runbook: no-transaction
create or replace function pg_temp.p2_ensure_not_null(p_table text, p_col text) returns text
language plpgsql
as $fn$
declare
  v_rel constant regclass := format('public.%I', p_table)::regclass;
  v_check constant text := format('%s_%s_not_null_check', p_table, p_col);
begin
  if not (select a.attnotnull from pg_catalog.pg_attribute a where a.attrelid = v_rel and a.attname = p_col) then
    perform pg_temp.p2_ensure_check(p_table, v_check, format('%I is not null', p_col));
    return v_check;
  end if;
  if exists (select 1 from pg_catalog.pg_constraint c where c.conrelid = v_rel and c.conname = v_check) then
    execute format('alter table %s drop constraint %I', v_rel, v_check);
  end if;
  return null;
end
$fn$;

-- Redaction of plaintext keys wherever they were copied, planned under the lock and done after the commit:
-- the keys wait in private.redaction_keys (owner only; truncated when done), every public table with
-- text or json columns gets a row trigger zz_p2_redact that redacts what the app writes meanwhile, and the
-- batches of section 11 send the rows already there that hold a copy through it (one definition of the
-- redaction). Finding copies is linear in the data, not rows x keys: every copy of a key lies inside a
-- maximal run of the characters keys are made of, so a value is cut into such runs (one regular-
-- expression pass), each run into its substrings of the keys' lengths, and those are looked up in the
-- key set's index; values without the prefix all keys share (often a scheme like sk_live_) are skipped
-- by strpos first. The functions made here are dropped with the triggers at the end.
-- runbook: no-transaction
create or replace function pg_temp.p2_plan_redaction() returns void
language plpgsql
as $fn$
declare
  v_class text;
  v_lengths int[];
  v_prefix text := '';
  v_first text;
  v_last text;
  v_all text;
  r record;
begin
  -- the prefix every key shares: in byte order, the common prefix of the first key and the last
  select min(k.plaintext collate "C"), max(k.plaintext collate "C"), string_agg(k.plaintext, ''),
         array_agg(distinct length(k.plaintext))
    into v_first, v_last, v_all, v_lengths
    from private.redaction_keys as k;
  while length(v_prefix) < least(length(v_first), length(v_last))
        and substr(v_first, length(v_prefix) + 1, 1) = substr(v_last, length(v_prefix) + 1, 1) loop
    v_prefix := v_prefix || substr(v_first, length(v_prefix) + 1, 1);
  end loop;
  -- the characters keys are made of, as a bracket expression: letters and digits found in the keys as
  -- themselves, any other character escaped (one pass over the keys, not a row per character)
  select string_agg(s.c, '' order by s.c) into v_class
    from (select a.c from regexp_split_to_table('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789', '') as a (c)
           where strpos(v_all, a.c) > 0
          union
          select case when ascii(o.c) > 65535 then '\U' || lpad(to_hex(ascii(o.c)), 8, '0')
                      else '\u' || lpad(to_hex(ascii(o.c)), 4, '0') end
            from regexp_split_to_table(regexp_replace(v_all, '[A-Za-z0-9]+', '', 'g'), '') as o (c)
           where o.c <> '') as s (c);
  -- the keys a text holds (NULL: none). The candidate substrings are looked up in the keys' index
  -- (= any: an index probe each), never hashed against the whole key set: per value, the cost follows the
  -- value's length, not the number of keys
  execute format($x$create or replace function private.p2_secret_copies(p_text text) returns text[]
language plpgsql stable
set search_path = ''
as $f$
declare
  v_found text[];
begin
  if strpos(p_text, %3$s) = 0 then
    return null;
  end if;
  select array_agg(k.plaintext order by k.plaintext) into v_found
    from private.redaction_keys as k
   where k.plaintext = any (array(
           select substr(m.run[1], p.pos, l.len)
             from regexp_matches(p_text, %1$s, 'g') as m (run)
            cross join unnest(%2$s::int[]) as l (len)
            cross join generate_series(1, length(m.run[1]) - l.len + 1) as p (pos)));
  return v_found;
end
$f$$x$, quote_literal(format('[%s]{%s,}', v_class, least((select min(x) from unnest(v_lengths) as x), 255))),
        quote_literal(v_lengths), quote_literal(v_prefix));
  -- a text with each key it holds replaced by a mark naming the key's prefix
  create or replace function private.p2_redact_text(p_text text, p_secrets text[]) returns text
  language plpgsql immutable
  set search_path = ''
  as $f$
  declare
    v_secret text;
  begin
    foreach v_secret in array p_secrets loop
      p_text := replace(p_text, v_secret, format('[redacted api key %s...]', left(v_secret, least(12, length(v_secret) / 3))));
    end loop;
    return p_text;
  end
  $f$;
  -- the same through a json document, keys and values
  create or replace function private.p2_redact_jsonb(p_doc jsonb, p_secrets text[]) returns jsonb
  language sql immutable
  set search_path = ''
  as $f$
    select case jsonb_typeof(p_doc)
      when 'object' then coalesce((select jsonb_object_agg(private.p2_redact_text(e.key, p_secrets), private.p2_redact_jsonb(e.value, p_secrets))
                                     from jsonb_each(p_doc) as e), '{}'::jsonb)
      when 'array' then coalesce((select jsonb_agg(private.p2_redact_jsonb(e.value, p_secrets) order by e.n)
                                    from jsonb_array_elements(p_doc) with ordinality as e (value, n)), '[]'::jsonb)
      when 'string' then to_jsonb(private.p2_redact_text(p_doc #>> '{}', p_secrets))
      else p_doc
    end
  $f$;
  revoke all on function private.p2_secret_copies(text), private.p2_redact_text(text, text[]),
                         private.p2_redact_jsonb(jsonb, text[]) from public, anon, authenticated, service_role;
  -- per table: the trigger, and the batches' work in private.pending_redactions
  for r in
    select c.oid::regclass as rel,
           string_agg(format('t.%I::text', a.attname), ', ' order by a.attname) as row_texts,
           min(a.attname) as first_column
      from pg_catalog.pg_class c
      join pg_catalog.pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
     where c.relnamespace = 'public'::regnamespace and c.relkind = 'r'
       and a.atttypid in ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype, 'json'::regtype, 'jsonb'::regtype)
     group by c.oid
     order by c.oid::regclass::text
  loop
    perform pg_temp.p2_redaction_trigger(r.rel);
    insert into private.pending_redactions (table_name, text_expr, first_column, prefix)
    values (r.rel::text, format('concat_ws(chr(1), %s)', r.row_texts), r.first_column, v_prefix)
    on conflict (table_name) do nothing;
  end loop;
end
$fn$;

-- The redaction trigger of one table (zz_p2_redact, private.p2_redact_<oid>), over the text and json
-- columns it has now: made when the redaction is planned, and again wherever a column is swapped in or
-- dropped after the commit, so that it never names a column that is gone. Security definer: it reads the
-- keys, which no API role may; it fires after the table's other BEFORE triggers (name order), so the
-- migration's own writes (truthsource.migration_write on) can keep updated_at as it was.
-- runbook: no-transaction
create or replace function pg_temp.p2_redaction_trigger(p_rel regclass) returns void
language plpgsql
as $fn$
declare
  r record;
  v_function constant text := format('private.%I', 'p2_redact_' || coalesce(
    (select substring(t.tgfoid::regproc::text from 'p2_redact_(\d+)$') from pg_catalog.pg_trigger t
      where t.tgrelid = p_rel and t.tgname = 'zz_p2_redact'), p_rel::oid::text));
begin
  select string_agg(format('new.%I::text', a.attname), ', ' order by a.attname) filter (where a.atttypid in ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype, 'json'::regtype, 'jsonb'::regtype)) as new_texts,
         string_agg(format('new.%1$I := case when exists (select 1 from unnest(v_found) as s where strpos(new.%1$I::text, s) > 0) then %2$s else new.%1$I end;',
                           a.attname, case a.atttypid
                                        when 'jsonb'::regtype then format('private.p2_redact_jsonb(new.%I, v_found)', a.attname)
                                        when 'json'::regtype then format('private.p2_redact_jsonb(new.%I::jsonb, v_found)::json', a.attname)
                                        else format('private.p2_redact_text(new.%I, v_found)', a.attname)
                                      end), chr(10) || '    ' order by a.attname) filter (where a.atttypid in ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype, 'json'::regtype, 'jsonb'::regtype)) as redactions,
         bool_or(a.attname = 'updated_at') as has_updated_at
    into r
    from pg_catalog.pg_attribute a
   where a.attrelid = p_rel and a.attnum > 0 and not a.attisdropped
     and (a.atttypid in ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype, 'json'::regtype, 'jsonb'::regtype)
          or a.attname = 'updated_at');
  execute format($x$create or replace function %1$s() returns trigger
language plpgsql
security definer
set search_path = ''
as $f$
declare
  v_found text[] := private.p2_secret_copies(concat_ws(chr(1), %2$s));
begin
  if v_found is not null then
    %3$s
  end if;%4$s
  return new;
end
$f$$x$, v_function, r.new_texts, r.redactions,
    case when r.has_updated_at then $u$
  if tg_op = 'UPDATE' and current_setting('truthsource.migration_write', true) = 'on' then
    new.updated_at := old.updated_at;
  end if;$u$ else '' end);
  execute format('revoke all on function %s() from public, anon, authenticated, service_role', v_function);
  execute format('drop trigger if exists zz_p2_redact on %s', p_rel);
  execute format('create trigger zz_p2_redact before insert or update on %s for each row execute function %s()', p_rel, v_function);
  execute format('alter table %s enable always trigger zz_p2_redact', p_rel);
end
$fn$;

-- a policy as the statements that make it again (on whatever table then bears its table's name)
-- runbook: no-transaction
create or replace function pg_temp.p2_policy_sql(p_policy oid) returns text
language sql stable
as $fn$
  select format('create policy %I on %s as %s for %s to %s%s%s;', p.polname, p.polrelid::regclass,
                case when p.polpermissive then 'permissive' else 'restrictive' end,
                case p.polcmd when 'r' then 'select' when 'a' then 'insert' when 'w' then 'update' when 'd' then 'delete' else 'all' end,
                (select string_agg(case when x = 0 then 'public' else quote_ident(pg_catalog.pg_get_userbyid(x)) end, ', ' order by x)
                   from unnest(p.polroles) as x),
                ' using (' || pg_catalog.pg_get_expr(p.polqual, p.polrelid) || ')',
                ' with check (' || pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid) || ')')
         || coalesce(format(' comment on policy %I on %s is ', p.polname, p.polrelid::regclass)
                     || quote_literal(pg_catalog.obj_description(p.oid, 'pg_policy')) || ';', '')
    from pg_catalog.pg_policy as p where p.oid = p_policy
$fn$;

-- a trigger as the statements that make it again, enabled as it was, with its comment
-- runbook: no-transaction
create or replace function pg_temp.p2_trigger_sql(p_trigger oid) returns text
language sql stable
as $fn$
  select pg_catalog.pg_get_triggerdef(t.oid) || ';'
         || case t.tgenabled when 'D' then format(' alter table %s disable trigger %I;', t.tgrelid::regclass, t.tgname)
                             when 'R' then format(' alter table %s enable replica trigger %I;', t.tgrelid::regclass, t.tgname)
                             when 'A' then format(' alter table %s enable always trigger %I;', t.tgrelid::regclass, t.tgname)
                             else '' end
         || coalesce(format(' comment on trigger %I on %s is ', t.tgname, t.tgrelid::regclass)
                     || quote_literal(pg_catalog.obj_description(t.oid, 'pg_trigger')) || ';', '')
    from pg_catalog.pg_trigger as t where t.oid = p_trigger
$fn$;

-- The swap of a converted column, under the table's lock (pg_temp.p2_finish_backfills): the legacy column
-- goes, the hidden one takes its name, its default, its comment, the sequences it owned, and the policies
-- and triggers that read it (made again from their definitions); the contract's checks on it come back NOT
-- VALID and are validated after the commit, NOT NULL through its check. The contract's indexes on it are
-- built concurrently after the commit (section 11); a legacy index on it is named, with its definition.
-- runbook: no-transaction
create or replace function pg_temp.p2_swap_column(p_rel regclass, p_col text, p_hidden text, p_dflt text) returns void
language plpgsql
as $fn$
declare
  v_table constant text := (select c.relname from pg_catalog.pg_class c where c.oid = p_rel);
  v_attnum constant smallint := (select a.attnum from pg_catalog.pg_attribute a
                                   where a.attrelid = p_rel and a.attname = p_col and not a.attisdropped);
  v_comment constant text := pg_catalog.col_description(p_rel, v_attnum);
  v_from constant text := pg_temp.p2_column_type(p_rel, p_col);
  v_again text := '';
  v_sequences text[] := '{}';
  v_sequence text;
  r record;
begin
  for r in
    select distinct d.classid, d.objid
      from pg_catalog.pg_depend d
     where d.refclassid = 'pg_catalog.pg_class'::regclass and d.refobjid = p_rel and d.refobjsubid = v_attnum
       and d.classid in ('pg_catalog.pg_policy'::regclass, 'pg_catalog.pg_trigger'::regclass)
     order by 1, 2
  loop
    if r.classid = 'pg_catalog.pg_policy'::regclass then
      v_again := v_again || pg_temp.p2_policy_sql(r.objid);
      execute format('drop policy %I on %s', (select p.polname from pg_catalog.pg_policy p where p.oid = r.objid), p_rel);
    elsif not (select t.tgisinternal from pg_catalog.pg_trigger t where t.oid = r.objid) then
      v_again := v_again || pg_temp.p2_trigger_sql(r.objid);
      execute format('drop trigger %I on %s', (select t.tgname from pg_catalog.pg_trigger t where t.oid = r.objid), p_rel);
    end if;
  end loop;
  for r in
    select s.oid::regclass as seq from pg_catalog.pg_depend d join pg_catalog.pg_class s on s.oid = d.objid and s.relkind = 'S'
     where d.classid = 'pg_catalog.pg_class'::regclass and d.refobjid = p_rel and d.refobjsubid = v_attnum and d.deptype = 'a'
  loop
    execute format('alter sequence %s owned by none', r.seq);
    v_sequences := v_sequences || r.seq::text;
  end loop;
  for r in
    select ic.relname, pg_catalog.pg_get_indexdef(i.indexrelid) as def
      from pg_catalog.pg_index i join pg_catalog.pg_class ic on ic.oid = i.indexrelid
     where i.indrelid = p_rel and (v_attnum = any (i.indkey::smallint[])
                                   or exists (select 1 from pg_catalog.pg_depend d
                                               where d.classid = 'pg_catalog.pg_class'::regclass and d.objid = i.indexrelid
                                                 and d.refobjid = p_rel and d.refobjsubid = v_attnum))
       and ic.relname not in ('organizations_slug_key', 'organization_members_organization_id_user_id_key',
                              'products_organization_id_sku_key', 'inventory_product_id_location_key', 'api_keys_key_hash_key',
                              'audit_logs_created_at_idx', 'audit_logs_record_id_idx', 'audit_logs_organization_id_created_at_idx',
                              'audit_logs_user_id_created_at_idx', 'security_events_organization_id_created_at_idx',
                              'security_events_user_id_created_at_idx', 'security_events_ip_address_created_at_idx',
                              'security_events_created_at_idx')
  loop
    raise warning '%: legacy index % goes with the legacy column % (it cannot be rebuilt here without blocking writes): re-create it with % concurrently if the app still needs it',
      p_rel, quote_ident(r.relname), p_col, r.def;
  end loop;
  execute format('alter table %s drop column %I', p_rel, p_col);
  execute format('alter table %s rename column %I to %I', p_rel, p_hidden, p_col);
  if p_dflt is not null then
    execute format('alter table %s alter column %I set default %s', p_rel, p_col, p_dflt);
  end if;
  if v_comment is not null then
    execute format('comment on column %s.%I is %L', p_rel, p_col, v_comment);
  end if;
  foreach v_sequence in array v_sequences loop
    execute format('alter sequence %s owned by %s.%I', v_sequence, p_rel, p_col);
  end loop;
  if v_again <> '' then
    execute v_again;
  end if;
  for r in select c.name, c.expr from pg_temp.p2_contract_checks() as c where c.tbl = v_table and p_col = any (c.cols) order by 1 loop
    perform pg_temp.p2_ensure_check(v_table, r.name, r.expr);
  end loop;
  if (select sp.not_null from pg_temp.p2_spec() as sp where sp.tbl = v_table and sp.col = p_col) then
    perform pg_temp.p2_ensure_not_null(v_table, p_col);
  end if;
  raise notice '%: column % converted from % to % %, then swapped in', p_rel, p_col, v_from, pg_temp.p2_column_type(p_rel, p_col),
    case when pg_temp.p2_carried_in_rewrite(p_rel) then 'as the table was copied' else 'in batches' end;
end
$fn$;

-- the columns the planned backfills of a table write (their rules wait for the swap: a batch writing a
-- legacy row that breaks one would be refused)
-- runbook: no-transaction
create or replace function pg_temp.p2_backfill_written(p_rel regclass) returns text[]
language plpgsql stable
as $fn$
begin
  return (select coalesce(array_agg(distinct w.col), '{}')
            from private.pending_backfills as b
           cross join lateral unnest(case b.kind when 'split' then array['old_data', 'new_data'] when 'convert' then array[]::text[]
                                                 else array[b.target] end) as w (col)
           where b.table_name::regclass = p_rel);
end
$fn$;

-- true when a row satisfies every rule of its table that is still NOT VALID (a legacy row that breaks one
-- cannot be written by a batch: it waits as a leftover for the table's short locked transaction)
-- runbook: no-transaction
create or replace function pg_temp.p2_rules_hold(p_rel regclass) returns text
language sql stable
as $fn$
  select coalesce(string_agg(format('(%s) is not false', pg_catalog.pg_get_expr(c.conbin, c.conrelid)), ' and ' order by c.conname), 'true')
    from pg_catalog.pg_constraint c
   where c.conrelid = p_rel and c.contype = 'c' and not c.convalidated
$fn$;

-- The rows of a table that a batch could not write because they break a rule added NOT VALID (legacy rows
-- kept as they are), written here in the table's short transaction under its lock (the caller holds it),
-- with its NOT VALID checks set aside for that moment and put back as they were. p_set and p_where say
-- what the batch would have done; the rows are found by the ctids the batches kept, so nothing is read.
-- runbook: no-transaction
create or replace function pg_temp.p2_write_leftovers(p_rel regclass, p_kind text, p_set text, p_where text) returns bigint
language plpgsql
as $fn$
declare
  v_table constant text := (select format('%I.%I', n.nspname, c.relname) from pg_catalog.pg_class c
                              join pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = p_rel);
  v_tids tid[];
  v_names text[] := '{}';
  v_rules text[] := '{}';
  v_quiet text[];
  v_count bigint;
  r record;
begin
  v_tids := array(select l.row_ctid from private.backfill_leftovers as l where l.table_name = v_table and l.kind = p_kind);
  if cardinality(v_tids) = 0 then
    return 0;
  end if;
  for r in
    select c.conname, pg_catalog.pg_get_constraintdef(c.oid) as def from pg_catalog.pg_constraint c
     where c.conrelid = p_rel and c.contype = 'c' and not c.convalidated order by 1
  loop
    v_names := v_names || r.conname::text;
    v_rules := v_rules || r.def;
    execute format('alter table %s drop constraint %I', p_rel, r.conname);
  end loop;
  v_quiet := pg_temp.p2_triggers_off(p_rel);
  execute format('update %s as t set %s where t.ctid = any ($1) and %s', p_rel, p_set, p_where) using v_tids;
  get diagnostics v_count = row_count;
  perform pg_temp.p2_triggers_on(p_rel, v_quiet);
  for i in 1 .. cardinality(v_rules) loop
    execute format('alter table %s add constraint %I %s', p_rel, v_names[i], v_rules[i]);
  end loop;
  delete from private.backfill_leftovers as l where l.table_name = v_table and l.kind = p_kind;
  return v_count;
end
$fn$;

-- the same for a step that does not hold the table's lock yet: NULL when it is not granted within
-- lock_timeout (the caller asks again after a pause), else the rows written
-- runbook: no-transaction
create or replace function pg_temp.p2_locked_leftovers(p_rel regclass, p_kind text, p_set text, p_where text) returns bigint
language plpgsql
as $fn$
begin
  execute format('lock table %s in access exclusive mode', p_rel);
  return pg_temp.p2_write_leftovers(p_rel, p_kind, p_set, p_where);
exception when lock_not_available then
  return null;
end
$fn$;

-- The end of a table's backfills, in one short transaction under its lock: the legacy columns dropped, the
-- converted ones swapped in, the carried columns' defaults set, the trigger, the marker and an unused
-- legacy_data gone. Nothing is read: every row written since the commit went through the trigger (enabled
-- ALWAYS, so a session in replica mode is no exception) and the batches covered every page there was; only
-- a trigger someone disabled meanwhile leaves rows behind, and then they are carried here, with a warning.
-- False when the lock is not granted within lock_timeout (the caller retries).
-- runbook: no-transaction
create or replace function pg_temp.p2_finish_backfills(p_rel regclass) returns boolean
language plpgsql
as $fn$
declare
  v_table constant text := (select format('%I.%I', n.nspname, c.relname) from pg_catalog.pg_class c
                              join pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = p_rel);
  j record;
  v_late bigint := 0;
  v_written text[];
begin
  execute format('lock table %s in access exclusive mode', p_rel);
  if (select t.tgenabled from pg_catalog.pg_trigger t where t.tgrelid = p_rel and t.tgname = 'zz_p2_backfill') is distinct from 'A' then
    raise warning '%: its backfill trigger was disabled after the commit: the rows written meanwhile are carried now, under the lock', p_rel;
    execute format('alter table %s enable always trigger zz_p2_backfill', p_rel);
    perform set_config('truthsource.migration_write', 'on', true);
    execute format('update %s set p2_carried = true where p2_carried is not true', p_rel);
    get diagnostics v_late = row_count;
  end if;
  perform set_config('truthsource.migration_write', 'on', true);
  v_late := v_late + pg_temp.p2_write_leftovers(p_rel, 'backfill', 'p2_carried = true', 'p2_carried is not true');
  v_written := pg_temp.p2_backfill_written(p_rel);
  for j in select b.* from private.pending_backfills as b where b.table_name = v_table order by b.ord loop
    if j.kind = 'convert' then
      perform pg_temp.p2_swap_column(p_rel, j.source, j.target, j.dflt);
    elsif j.kind = 'fill' then
      raise notice '%: column % filled for % row(s) in batches', p_rel, j.target, j.rows_done + v_late;
    else
      raise notice '%: legacy column % (%) carried into % (%) for % row(s) %, then dropped', p_rel, j.source, j.from_type,
        case j.kind when 'split' then 'old_data/new_data' else j.target end, j.to_type, j.rows_done + v_late,
        case when pg_temp.p2_carried_in_rewrite(p_rel) then 'as the table was copied' else 'in batches' end;
      execute format('alter table %s drop column %I', p_rel, j.source);
      if j.dflt is not null then
        execute format('alter table %s alter column %I set default %s', p_rel, j.target, j.dflt);
      end if;
    end if;
  end loop;
  execute format('drop trigger zz_p2_backfill on %s', p_rel);
  execute format('drop function private.%I()', 'p2_backfill_' || (select c.relname from pg_catalog.pg_class c where c.oid = p_rel));
  execute format('alter table %s drop column p2_carried', p_rel);
  if exists (select 1 from private.pending_backfills as b where b.table_name = v_table and b.legacy_data_added)
     and not exists (select 1 from private.backfill_stashes as s where s.table_name = v_table) then
    execute format('alter table %s drop column legacy_data', p_rel);
  end if;
  delete from private.backfill_stashes as s where s.table_name = v_table;
  delete from private.pending_backfills as b where b.table_name = v_table;
  -- the rules on the columns the backfills wrote, NOT VALID (validated below, after the commit)
  for j in
    select sp.col, sp.not_null from pg_temp.p2_spec() as sp
     where format('public.%I', sp.tbl) = v_table and sp.col = any (v_written) order by sp.ord
  loop
    if j.not_null then
      perform pg_temp.p2_ensure_not_null(split_part(v_table, '.', 2), j.col);
    end if;
  end loop;
  for j in
    select c.name, c.expr from pg_temp.p2_contract_checks() as c
     where format('public.%I', c.tbl) = v_table and c.cols && v_written order by 1
  loop
    perform pg_temp.p2_ensure_check(split_part(v_table, '.', 2), j.name, j.expr);
  end loop;
  if exists (select 1 from pg_catalog.pg_trigger t where t.tgrelid = p_rel and t.tgname = 'zz_p2_redact') then
    perform pg_temp.p2_redaction_trigger(p_rel);
  end if;
  return true;
exception when lock_not_available then
  return false;
end
$fn$;

-- Online rewrite of a table that held plaintext keys (section 11), the pg_repack way in plain SQL: a copy of
-- the table (private.p2_rewrite_<oid>: same columns, the unique indexes first), a trigger on the table that
-- logs the key of every row the app writes (private.p2_rewrite_log_<oid>), the rows copied in batches of
-- pages, the other indexes built on the copy, the log replayed in batches, then one short transaction
-- under the table's lock: the rest of the log replayed (what came in since the last batch), and the copy
-- put in the table's place with everything the table carries. Only live rows are copied, into new files:
-- no dead row version, and no value of a dropped column, keeps a key. Each step is kept in
-- private.pending_rewrites (step, pages_done of pages_total, rows_replayed), so a re-run resumes.

-- the key the copy and the log identify a row by: the primary key, else a unique index on NOT NULL
-- columns (no predicate, no expression); NULL when there is none
-- runbook: no-transaction
create or replace function pg_temp.p2_rewrite_key(p_rel regclass) returns text[]
language sql stable
as $fn$
  select pg_temp.p2_column_names(p_rel, i.indkey::smallint[])
    from pg_catalog.pg_index i
   where i.indrelid = p_rel and i.indisunique and i.indisvalid and i.indimmediate and i.indpred is null and i.indexprs is null
     and not exists (select 1 from pg_catalog.pg_attribute a
                      where a.attrelid = p_rel and a.attnum = any (i.indkey::smallint[]) and not a.attnotnull)
   order by i.indisprimary desc, i.indexrelid
   limit 1
$fn$;

-- why a table cannot be rewritten online (it is then rewritten by CLUSTER, under its lock), or NULL: what
-- the swap would not carry over exactly
-- runbook: no-transaction
create or replace function pg_temp.p2_rewrite_blocker(p_rel regclass) returns text
language plpgsql stable
as $fn$
declare
  c record;
  v_others text;
begin
  select * into c from pg_catalog.pg_class where oid = p_rel;
  if pg_temp.p2_rewrite_key(p_rel) is null then
    return 'no primary key or unique index on NOT NULL columns to identify its rows by';
  elsif c.relkind <> 'r' or c.relispartition or c.relhassubclass or c.reloftype <> 0
        or exists (select 1 from pg_catalog.pg_inherits i where i.inhrelid = p_rel) then
    return 'it is partitioned, inherited or typed';
  elsif c.relforcerowsecurity and not (select r.rolsuper or r.rolbypassrls from pg_catalog.pg_roles r where r.rolname = current_user) then
    return 'FORCE ROW LEVEL SECURITY would hide rows from the copy';
  elsif exists (select 1 from pg_catalog.pg_constraint k where k.conrelid = p_rel and k.contype = 'x') then
    return 'an exclusion constraint cannot be attached to an index built beforehand';
  end if;
  -- what depends on the table or its row type, beyond what it carries itself and views of its owner
  select string_agg(distinct pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid), ', ') into v_others
    from pg_catalog.pg_depend d
   where ((d.refclassid = 'pg_catalog.pg_class'::regclass and d.refobjid = p_rel)
          or (d.refclassid = 'pg_catalog.pg_type'::regclass and d.refobjid = c.reltype))
     and d.deptype in ('n', 'a')
     and not (d.classid = 'pg_catalog.pg_class'::regclass
              and (select x.relkind in ('i', 'S') from pg_catalog.pg_class x where x.oid = d.objid))
     and not (d.classid = 'pg_catalog.pg_type'::regclass and d.objid in (c.reltype, (select t.typarray from pg_catalog.pg_type t where t.oid = c.reltype)))
     and not (d.classid = 'pg_catalog.pg_constraint'::regclass)
     and not (d.classid = 'pg_catalog.pg_trigger'::regclass)
     and not (d.classid = 'pg_catalog.pg_attrdef'::regclass)
     and not (d.classid = 'pg_catalog.pg_statistic_ext'::regclass)
     and not (d.classid = 'pg_catalog.pg_publication_rel'::regclass)
     and not (d.classid = 'pg_catalog.pg_policy'::regclass
              and (select p.polrelid = p_rel from pg_catalog.pg_policy p where p.oid = d.objid))
     and not (d.classid = 'pg_catalog.pg_rewrite'::regclass
              and (select v.relkind = 'v' and pg_catalog.pg_has_role(v.relowner, 'USAGE')
                     from pg_catalog.pg_rewrite w join pg_catalog.pg_class v on v.oid = w.ev_class where w.oid = d.objid));
  if v_others is not null then
    return format('%s depend(s) on it', v_others);
  end if;
  return null;
end
$fn$;

-- the columns a copy writes (generated columns are computed again)
-- runbook: no-transaction
create or replace function pg_temp.p2_rewrite_columns(p_rel regclass) returns text
language sql stable
as $fn$
  select string_agg(quote_ident(a.attname), ', ' order by a.attnum)
    from pg_catalog.pg_attribute a
   where a.attrelid = p_rel and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
$fn$;

-- api_keys' plaintext key columns still there (the names the contract lists, of a text type), in column order
-- runbook: no-transaction
create or replace function pg_temp.p2_plaintext_key_columns() returns text[]
language sql stable
as $fn$
  select coalesce(array_agg(a.attname::text order by a.attnum), '{}')
    from pg_catalog.pg_attribute a
   where a.attrelid = to_regclass('public.api_keys') and a.attnum > 0 and not a.attisdropped
     and a.atttypid in ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype)
     and a.attname in ('key', 'api_key', 'secret', 'secret_key', 'token', 'plaintext_key', 'plain_key', 'raw_key', 'key_value')
$fn$;

-- For a statement whose lock the app never queues behind (VALIDATE CONSTRAINT: SHARE UPDATE EXCLUSIVE), this
-- transaction's lock_timeout at least three times deadlock_timeout: past deadlock_timeout PostgreSQL cancels an
-- autovacuum that holds the table (one on a freshly rewritten table runs for minutes), which a shorter
-- lock_timeout never reaches (0, no limit, stays)
-- runbook: no-transaction
create or replace function pg_temp.p2_outwait_autovacuum() returns void
language sql
as $fn$
  select set_config('lock_timeout',
                    case when current_setting('lock_timeout')::interval = interval '0' then '0'
                         else round(extract(epoch from greatest(current_setting('lock_timeout')::interval,
                                                                3 * current_setting('deadlock_timeout')::interval)) * 1000) || 'ms' end,
                    true)
$fn$;

-- Between two batches: while private.replication_backlog() (phase 1) names a streaming replica further
-- behind than truthsource.max_replica_lag seconds or WAL archiving behind, 'paused: <why>' and a wait of a
-- second at a time, each in a transaction of its own that holds no lock and no row
-- runbook: no-transaction
create or replace procedure pg_temp.p2_yield_to_replicas()
language plpgsql
as $fn$
declare
  v_behind text;
begin
  loop
    v_behind := private.replication_backlog();
    exit when v_behind is null;
    raise notice 'paused: %', v_behind;
    commit;
    perform pg_catalog.pg_sleep(1);
  end loop;
end
$fn$;

-- the copy's name, and its log's
-- runbook: no-transaction
create or replace function pg_temp.p2_rewrite_names(p_rel regclass, out shadow text, out log text, out log_function text,
                                                     out copy_function text)
language sql immutable
as $fn$
  select format('private.%I', 'p2_rewrite_' || p_rel::oid), format('private.%I', 'p2_rewrite_log_' || p_rel::oid),
         format('private.%I', 'p2_rewrite_log_' || p_rel::oid), format('private.%I', 'p2_rewrite_copy_' || p_rel::oid)
$fn$;

-- why a table is rewritten online for its backfills alone (private.pending_rewrites.reason): it is copied,
-- never rewritten by CLUSTER (a copy that cannot go ahead leaves its backfills to the batches of updates)
-- runbook: no-transaction
create or replace function pg_temp.p2_copy_for_backfills() returns text
language sql immutable
as $fn$
  select 'its rows converted as they are copied: one write of each row instead of an update that every index follows'
$fn$;

-- How long the steps after the commit wait for a lock at a time: the session's lock_timeout where it is
-- between 1 ms and 500 ms, else 500 ms (under deadlock_timeout, 1 s: the step gives up before an app that
-- waits behind it would be cancelled for a deadlock); then they commit, pause and ask again.
-- runbook: no-transaction
create or replace function pg_temp.p2_lock_wait() returns text
language sql stable
as $fn$
  select case when current_setting('lock_timeout')::interval between interval '1 millisecond' and interval '500 milliseconds'
              then current_setting('lock_timeout') else '500ms' end
$fn$;

-- The end of asking again: after 120 tries (about two minutes) the step stops, naming the table.
-- runbook: no-transaction
create or replace function pg_temp.p2_lock_not_granted(p_rel regclass, p_tries integer) returns void
language plpgsql
as $fn$
begin
  if p_tries >= 120 then
    raise exception '%: its lock was not granted within % in % tries (the app holds it): re-run this file',
      p_rel, pg_temp.p2_lock_wait(), p_tries
      using errcode = 'lock_not_available';
  end if;
end
$fn$;

-- How a table is rewritten: truthsource.rewrite_method, 'online' (the default) or 'cluster'; anything else stops.
-- runbook: no-transaction
create or replace function pg_temp.p2_rewrite_method() returns text
language plpgsql stable
as $fn$
declare
  v_method constant text := lower(coalesce(nullif(current_setting('truthsource.rewrite_method', true), ''), 'online'));
begin
  if v_method not in ('online', 'cluster') then
    raise exception 'truthsource.rewrite_method is %: online (the default) or cluster', quote_literal(v_method)
      using errcode = 'invalid_parameter_value';
  end if;
  return v_method;
end
$fn$;

-- Which tables' backfills ride on their online rewrite: the copy's batches send the rows not carried yet
-- through the table's backfill function (as the app's writes go) and copy its legacy columns empty, and the
-- swap's transaction finishes the backfills (pg_temp.p2_finish_backfills), so the table is read and written
-- once instead of twice. Decided once, when the backfills start (private.pending_rewrites.carries), for a
-- table whose rewrite is pending, not begun, and online. A table with no rewrite pending gets one when none
-- of its rows is carried yet and it has at least truthsource.copy_backfills_min_pages pages (1024 by
-- default: 8 MB): updating every row writes it again beside its old version, with an entry in every index,
-- where a copy writes each row once and builds its indexes by sorting.
-- runbook: no-transaction
create or replace function pg_temp.p2_plan_copies() returns void
language plpgsql
as $fn$
declare
  b record;
  v_min_pages constant bigint := coalesce(nullif(current_setting('truthsource.copy_backfills_min_pages', true), '')::bigint, 1024);
  v_online constant boolean := pg_temp.p2_rewrite_method() = 'online';
begin
  for b in select distinct p.table_name::regclass as rel from private.pending_backfills as p order by 1 loop
    if not exists (select 1 from private.pending_rewrites as r where to_regclass(r.table_name) = b.rel)
       and pg_catalog.pg_relation_size(b.rel) / current_setting('block_size')::bigint >= v_min_pages
       and v_online
       and pg_temp.p2_rewrite_blocker(b.rel) is null
       and not exists (select 1 from private.pending_backfills as d where to_regclass(d.table_name) = b.rel and d.rows_done > 0) then
      insert into private.pending_rewrites (table_name, reason, carries)
      values (b.rel::text, pg_temp.p2_copy_for_backfills(), true);
    end if;
    update private.pending_rewrites as r
       set carries = r.step = 'planned' and v_online and pg_temp.p2_rewrite_blocker(b.rel) is null
     where to_regclass(r.table_name) = b.rel and r.carries is null;
  end loop;
end
$fn$;

-- Whether a table's backfills ride on its online rewrite, as pg_temp.p2_plan_copies decided.
-- runbook: no-transaction
create or replace function pg_temp.p2_carried_in_rewrite(p_rel regclass) returns boolean
language plpgsql stable
as $fn$
begin
  return coalesce((select r.carries from private.pending_rewrites as r where to_regclass(r.table_name) = p_rel), false);
end
$fn$;

-- Step 1: the copy (the table's columns, defaults, identity, storage; its unique indexes, for the copy's
-- ON CONFLICT and the replay), the log of keys and the function that fills it. Nothing of the table is
-- locked yet. Idempotent: a re-run finds them.
-- runbook: no-transaction
create or replace function pg_temp.p2_rewrite_prepare(p_rel regclass) returns void
language plpgsql
as $fn$
declare
  n record := pg_temp.p2_rewrite_names(p_rel);
  c record;
  v_key text[] := pg_temp.p2_rewrite_key(p_rel);
  v_keys text := (select string_agg(quote_ident(k), ', ') from unnest(v_key) as k);
  v_sources text[];
  v_source text;
  r record;
begin
  select * into c from pg_catalog.pg_class where oid = p_rel;
  if to_regclass(n.shadow) is null then
    execute format('create %s table %s (like %s including defaults including identity including generated including storage including compression)%s%s',
                   case c.relpersistence when 'u' then 'unlogged' else '' end, n.shadow, p_rel,
                   case when c.reloptions is not null then format(' with (%s)', array_to_string(c.reloptions, ', ')) else '' end,
                   case when c.reltablespace <> 0 then format(' tablespace %I', (select t.spcname from pg_catalog.pg_tablespace t where t.oid = c.reltablespace)) else '' end);
    execute format('revoke all on table %s from public, anon, authenticated, service_role', n.shadow);
  end if;
  -- a copy that carries the table's backfills (pg_temp.p2_carried_in_rewrite): a row not carried yet goes
  -- through the table's backfill function as it is copied, and the legacy columns are copied empty (dropped
  -- in the swap's transaction, they leave no value in the new files)
  if (select p.carries from private.pending_rewrites as p where to_regclass(p.table_name) = p_rel) then
    v_sources := array(select b.source from private.pending_backfills as b
                        where to_regclass(b.table_name) = p_rel and b.kind <> 'fill' order by b.ord);
    foreach v_source in array v_sources loop
      execute format('alter table %s alter column %I drop not null', n.shadow, v_source);
    end loop;
    execute format($f$create or replace function %s() returns trigger
language plpgsql
set search_path = ''
as $body$
begin
  %s
  return new;
end
$body$$f$, n.copy_function, (select coalesce(string_agg(format('new.%I := null;', x), ' '), '') from unnest(v_sources) as x));
    execute format('revoke all on function %s() from public, anon, authenticated, service_role', n.copy_function);
    execute format('create or replace trigger zz_p2_copy_carry before insert on %s for each row when (new.p2_carried is not true) execute function private.%I()',
                   n.shadow, 'p2_backfill_' || c.relname);
    execute format('create or replace trigger zz_p2_copy_empty before insert on %s for each row execute function %s()', n.shadow, n.copy_function);
  end if;
  for r in
    select i.indexrelid, pg_catalog.pg_get_indexdef(i.indexrelid) as def
      from pg_catalog.pg_index i where i.indrelid = p_rel and i.indisunique and i.indisvalid order by i.indexrelid
  loop
    execute format('create unique index if not exists %I on %s %s', 'p2r_' || r.indexrelid, n.shadow, substring(r.def from 'USING .*$'));
  end loop;
  if to_regclass(n.log) is null then
    execute format('create table %s (seq bigint generated always as identity primary key, %s)', n.log,
                   (select string_agg(format('%I %s', a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod)), ', ' order by k.n)
                      from unnest(v_key) with ordinality as k (col, n)
                      join pg_catalog.pg_attribute a on a.attrelid = p_rel and a.attname = k.col));
    execute format('revoke all on table %s from public, anon, authenticated, service_role', n.log);
  end if;
  -- the app's writes, logged by key (both keys of an update that changes it); a TRUNCATE empties the copy too
  execute format($f$create or replace function %1$s() returns trigger
language plpgsql
security definer
set search_path = ''
as $body$
begin
  if tg_op = 'TRUNCATE' then
    truncate %2$s;
    truncate %3$s;
    return null;
  end if;
  if tg_op in ('UPDATE', 'DELETE') then
    insert into %3$s (%4$s) values (%5$s);
  end if;
  if tg_op = 'INSERT' or (tg_op = 'UPDATE' and (%6$s) is distinct from (%5$s)) then
    insert into %3$s (%4$s) values (%6$s);
  end if;
  return null;
end
$body$$f$, n.log_function, n.shadow, n.log, v_keys,
    (select string_agg(format('old.%I', k), ', ') from unnest(v_key) as k),
    (select string_agg(format('new.%I', k), ', ') from unnest(v_key) as k));
  execute format('revoke all on function %s() from public, anon, authenticated, service_role', n.log_function);
end
$fn$;

-- Step 2: the trigger that logs the app's writes, created ENABLE ALWAYS. Creating it waits for the writes
-- in flight on the table to end (its lock conflicts with theirs): every write after it is logged, and the
-- copy's batches start after it. False when the lock is not granted within lock_timeout.
-- runbook: no-transaction
create or replace function pg_temp.p2_rewrite_trigger(p_rel regclass) returns boolean
language plpgsql
as $fn$
declare
  n record := pg_temp.p2_rewrite_names(p_rel);
begin
  if not exists (select 1 from pg_catalog.pg_trigger t where t.tgrelid = p_rel and t.tgname = 'zz_p2_rewrite_log') then
    execute format('create trigger zz_p2_rewrite_log after insert or update or delete on %s for each row execute function %s()',
                   p_rel, n.log_function);
    execute format('create trigger zz_p2_rewrite_log_truncate after truncate on %s for each statement execute function %s()',
                   p_rel, n.log_function);
    execute format('alter table %s enable always trigger zz_p2_rewrite_log', p_rel);
    execute format('alter table %s enable always trigger zz_p2_rewrite_log_truncate', p_rel);
  end if;
  return true;
exception when lock_not_available then
  return false;
end
$fn$;

-- One batch of the log replayed into the copy: the keys of up to p_limit entries taken out of the log (in
-- one statement: exactly the entries this snapshot sees, so an entry of a write that commits later stays
-- for a later batch), and for each key the copy made equal to the table now (a later write is logged
-- again). A row of the copy that holds a unique value a replayed row now holds is stale (its own write is
-- in the log): it goes first. Returns the number of keys replayed.
-- runbook: no-transaction
create or replace function pg_temp.p2_rewrite_replay(p_rel regclass, p_limit integer) returns bigint
language plpgsql
as $fn$
declare
  n record := pg_temp.p2_rewrite_names(p_rel);
  v_key text[] := pg_temp.p2_rewrite_key(p_rel);
  v_keys text := (select string_agg(quote_ident(k), ', ') from unnest(v_key) as k);
  v_on text := (select string_agg(format('t.%1$I = k.%1$I', k), ' and ') from unnest(v_key) as k);
  v_count bigint;
  r record;
begin
  execute format('create temporary table if not exists %I on commit delete rows as select %s from %s with no data',
                 'p2_replay_keys_' || p_rel::oid, v_keys, n.log);
  execute format('delete from pg_temp.%I', 'p2_replay_keys_' || p_rel::oid);
  execute format('with taken as (delete from %1$s where seq in (select seq from %1$s order by seq limit %2$s) returning %3$s)
                  insert into pg_temp.%4$I select distinct %3$s from taken', n.log, p_limit, v_keys, 'p2_replay_keys_' || p_rel::oid);
  get diagnostics v_count = row_count;
  if v_count = 0 then
    return 0;
  end if;
  execute format('delete from %s as t using pg_temp.%I as k where %s', n.shadow, 'p2_replay_keys_' || p_rel::oid, v_on);
  for r in
    select i.indnullsnotdistinct as nnd, pg_temp.p2_column_names(i.indrelid, i.indkey::smallint[]) as cols
      from pg_catalog.pg_index i
     where i.indrelid = to_regclass(n.shadow) and i.indisunique
       and pg_temp.p2_column_names(i.indrelid, i.indkey::smallint[]) <> v_key
  loop
    execute format('delete from %s as s using %s as t, pg_temp.%I as k where %s and %s', n.shadow, p_rel, 'p2_replay_keys_' || p_rel::oid, v_on,
                   (select string_agg(format(case when r.nnd then 's.%1$I is not distinct from t.%1$I' else 's.%1$I = t.%1$I' end, x), ' and ')
                      from unnest(r.cols) as x));
  end loop;
  execute format('insert into %1$s (%2$s) overriding system value select %3$s from %4$s as t join pg_temp.%5$I as k on %6$s on conflict do nothing',
                 n.shadow, pg_temp.p2_rewrite_columns(p_rel),
                 (select string_agg(format('t.%I', a.attname), ', ' order by a.attnum) from pg_catalog.pg_attribute a
                   where a.attrelid = p_rel and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''),
                 p_rel, 'p2_replay_keys_' || p_rel::oid, v_on);
  update private.pending_rewrites as p set rows_replayed = p.rows_replayed + v_count where p.table_name = p_rel::text;
  return v_count;
end
$fn$;

-- the columns of a table as a comparable list (name, type, generated): the copy must still match the table
-- runbook: no-transaction
create or replace function pg_temp.p2_rewrite_shape(p_rel regclass) returns text
language sql stable
as $fn$
  select string_agg(format('%s %s %s', quote_ident(a.attname), pg_catalog.format_type(a.atttypid, a.atttypmod), a.attgenerated), ', '
                    order by a.attnum)
    from pg_catalog.pg_attribute a where a.attrelid = p_rel and a.attnum > 0 and not a.attisdropped
$fn$;

-- the grants of an ACL as GRANT statements on p_object (a column list in p_columns: column grants)
-- runbook: no-transaction
create or replace function pg_temp.p2_grants_sql(p_acl aclitem[], p_kind text, p_object text, p_columns text default '') returns text
language sql stable
as $fn$
  select coalesce(string_agg(format('grant %s%s on %s %s to %s%s;', x.privilege_type, p_columns, p_kind, p_object,
                                    case when x.grantee = 0 then 'public' else quote_ident(pg_catalog.pg_get_userbyid(x.grantee)) end,
                                    case when x.is_grantable then ' with grant option' else '' end), ' '), '')
    from aclexplode(p_acl) as x
$fn$;

-- Step 5, in one short transaction under the table's lock (no one else writes it meanwhile): the rest of the
-- log replayed, then the copy takes the table's place and everything the table carries: its indexes and
-- their names, constraints (primary key and unique attached to the copy's indexes; checks and foreign keys,
-- its own and other tables' that point at it, added NOT VALID, and validated after the commit where they
-- were valid), triggers (enabled as they were), policies, row level security, replica identity, grants on
-- the table and its columns, owner, comments, publication membership, extended statistics, column
-- settings, the sequences its columns own, its identity's sequence (name and current value), and the views
-- that read it (made again from their definitions). The old table and its files go with the commit.
-- Returns the constraints to validate ('table|constraint'), or NULL when the lock is not granted within
-- lock_timeout.
-- runbook: no-transaction
create or replace function pg_temp.p2_rewrite_swap(p_rel regclass) returns text[]
language plpgsql
as $fn$
declare
  n record := pg_temp.p2_rewrite_names(p_rel);
  c record;
  v_nsp text;
  v_name text;
  v_old text;
  v_after text := '';
  v_views text := '';
  v_validate text[] := '{}';
  r record;
begin
  -- every other table the swap alters is locked first, the table itself last: holding the table's lock while
  -- waiting for another's, an app's transaction that waits on the table while it holds the other would make
  -- a deadlock, and PostgreSQL would cancel the app's transaction (it waits longer than lock_timeout)
  for r in select k.conrelid::regclass as tbl, 'access exclusive' as mode from pg_catalog.pg_constraint k
            where k.confrelid = p_rel and k.conrelid <> p_rel and k.contype = 'f'
           union
           select k.confrelid::regclass, 'share row exclusive' from pg_catalog.pg_constraint k
            where k.conrelid = p_rel and k.confrelid <> p_rel and k.contype = 'f'
           order by 1, 2 loop
    execute format('lock table %s in %s mode', r.tbl, r.mode);
  end loop;
  execute format('lock table %s in access exclusive mode', p_rel);
  while pg_temp.p2_rewrite_replay(p_rel, 100000) > 0 loop
  end loop;
  if pg_temp.p2_rewrite_shape(p_rel) is distinct from pg_temp.p2_rewrite_shape(to_regclass(n.shadow)) then
    raise exception '%: its columns changed while it was copied: re-run this file (the copy is made again)', p_rel
      using errcode = 'object_not_in_prerequisite_state';
  end if;
  select * into c from pg_catalog.pg_class where oid = p_rel;
  v_nsp := (select nspname from pg_catalog.pg_namespace where oid = c.relnamespace);
  v_name := format('%I.%I', v_nsp, c.relname);
  v_old := format('%I.%I', v_nsp, 'p2_old_' || p_rel::oid);
  -- constraints: the keys on the copy's indexes; checks and foreign keys NOT VALID, validated after the commit
  for r in
    select k.oid, k.conname, k.contype, k.conindid, k.convalidated, k.condeferrable, k.condeferred, pg_catalog.pg_get_constraintdef(k.oid) as def,
           pg_catalog.obj_description(k.oid, 'pg_constraint') as note
      from pg_catalog.pg_constraint k where k.conrelid = p_rel and k.contype in ('p', 'u', 'c', 'f') order by k.contype, k.conname
  loop
    if r.contype in ('p', 'u') then
      v_after := v_after || format('alter table %s add constraint %I %s using index %I%s%s;', v_name, r.conname,
                                   case r.contype when 'p' then 'primary key' else 'unique' end, 'p2r_' || r.conindid,
                                   case when r.condeferrable then ' deferrable' else '' end,
                                   case when r.condeferred then ' initially deferred' else '' end);
    else
      v_after := v_after || format('alter table %s add constraint %I %s%s;', v_name, r.conname, r.def,
                                   case when r.convalidated then ' not valid' else '' end);
      if r.convalidated then
        v_validate := v_validate || format('%s|%s', v_name, r.conname);
      end if;
    end if;
    if r.note is not null then
      v_after := v_after || format('comment on constraint %I on %s is %L;', r.conname, v_name, r.note);
    end if;
  end loop;
  -- foreign keys of other tables that point at it: dropped now, added again NOT VALID
  for r in
    select k.conrelid::regclass as tbl, k.conname, k.convalidated, pg_catalog.pg_get_constraintdef(k.oid) as def,
           pg_catalog.obj_description(k.oid, 'pg_constraint') as note
      from pg_catalog.pg_constraint k where k.confrelid = p_rel and k.conrelid <> p_rel and k.contype = 'f' order by 1, 2
  loop
    execute format('alter table %s drop constraint %I', r.tbl, r.conname);
    v_after := v_after || format('alter table %s add constraint %I %s%s;', r.tbl, r.conname, r.def,
                                 case when r.convalidated then ' not valid' else '' end)
               || coalesce(format('comment on constraint %I on %s is ', r.conname, r.tbl) || quote_literal(r.note) || ';', '');
    if r.convalidated then
      v_validate := v_validate || format('%s|%s', r.tbl, r.conname);
    end if;
  end loop;
  -- indexes not behind a constraint: the copy's take their names; comments of all
  for r in
    select i.indexrelid, ic.relname, pg_catalog.obj_description(i.indexrelid, 'pg_class') as note,
           exists (select 1 from pg_catalog.pg_constraint k where k.conindid = i.indexrelid and k.conrelid = p_rel) as constrained
      from pg_catalog.pg_index i join pg_catalog.pg_class ic on ic.oid = i.indexrelid where i.indrelid = p_rel order by 2
  loop
    if not r.constrained then
      v_after := v_after || format('alter index %I.%I rename to %I;', v_nsp, 'p2r_' || r.indexrelid, r.relname);
    end if;
    if r.note is not null then
      v_after := v_after || format('comment on index %I.%I is %L;', v_nsp, r.relname, r.note);
    end if;
  end loop;
  -- triggers (not the log's) and policies, made again from their definitions
  v_after := v_after || coalesce((select string_agg(pg_temp.p2_trigger_sql(t.oid), ' ' order by t.tgname) from pg_catalog.pg_trigger t
                                   where t.tgrelid = p_rel and not t.tgisinternal and t.tgname not like 'zz\_p2\_rewrite\_log%'), '')
                     || coalesce((select string_agg(pg_temp.p2_policy_sql(p.oid), ' ' order by p.polname) from pg_catalog.pg_policy p
                                   where p.polrelid = p_rel), '');
  -- row level security, replica identity, owner, grants, comments, publications, statistics
  v_after := v_after
    || case when c.relrowsecurity then format('alter table %s enable row level security;', v_name) else '' end
    || case when c.relforcerowsecurity then format('alter table %s force row level security;', v_name) else '' end
    || case c.relreplident
         when 'f' then format('alter table %s replica identity full;', v_name)
         when 'n' then format('alter table %s replica identity nothing;', v_name)
         when 'i' then format('alter table %s replica identity using index %I;', v_name,
                              (select ic.relname from pg_catalog.pg_index i join pg_catalog.pg_class ic on ic.oid = i.indexrelid
                                where i.indrelid = p_rel and i.indisreplident))
         else '' end
    || format('alter table %s owner to %I;', v_name, pg_catalog.pg_get_userbyid(c.relowner))
    || format('revoke all on table %s from public%s;', v_name,
              coalesce((select string_agg(distinct ', ' || quote_ident(pg_catalog.pg_get_userbyid(x.grantee)), '')
                          from aclexplode((select s.relacl from pg_catalog.pg_class s where s.oid = to_regclass(n.shadow))) as x
                         where x.grantee <> 0), ''))
    || case when c.relacl is null then format('grant all on table %s to %I;', v_name, pg_catalog.pg_get_userbyid(c.relowner))
            else pg_temp.p2_grants_sql(c.relacl, 'table', v_name) end
    || coalesce(format('comment on table %s is ', v_name) || quote_literal(pg_catalog.obj_description(p_rel, 'pg_class')) || ';', '')
    || coalesce((select string_agg(
                   coalesce(format('comment on column %s.%I is ', v_name, a.attname) || quote_literal(pg_catalog.col_description(p_rel, a.attnum)) || ';', '')
                   || pg_temp.p2_grants_sql(a.attacl, 'table', v_name, format(' (%I)', a.attname))
                   || case when a.attstattarget is not null and a.attstattarget >= 0
                           then format('alter table %s alter column %I set statistics %s;', v_name, a.attname, a.attstattarget) else '' end
                   || case when a.attoptions is not null
                           then format('alter table %s alter column %I set (%s);', v_name, a.attname, array_to_string(a.attoptions, ', ')) else '' end,
                   '' order by a.attnum)
                  from pg_catalog.pg_attribute a where a.attrelid = p_rel and a.attnum > 0 and not a.attisdropped), '')
    || coalesce((select string_agg(format('alter publication %I add table only %s%s%s;', p.pubname, v_name,
                                          case when pr.prattrs is not null then format(' (%s)', (select string_agg(quote_ident(a.attname), ', ' order by a.attnum)
                                                                                                  from pg_catalog.pg_attribute a where a.attrelid = p_rel and a.attnum = any (pr.prattrs))) else '' end,
                                          coalesce(' where (' || pg_catalog.pg_get_expr(pr.prqual, pr.prrelid) || ')', '')), ' ' order by p.pubname)
                  from pg_catalog.pg_publication_rel pr join pg_catalog.pg_publication p on p.oid = pr.prpubid where pr.prrelid = p_rel), '')
    || coalesce((select string_agg(pg_catalog.pg_get_statisticsobjdef(s.oid) || ';'
                                   || case when s.stxstattarget is not null and s.stxstattarget >= 0
                                           then format('alter statistics %I.%I set statistics %s;', (select ns.nspname from pg_catalog.pg_namespace ns where ns.oid = s.stxnamespace), s.stxname, s.stxstattarget)
                                           else '' end, ' ' order by s.stxname)
                  from pg_catalog.pg_statistic_ext s where s.stxrelid = p_rel), '');
  -- sequences: those its columns own follow the copy's columns; an identity's takes the old one's name and value
  for r in
    select s.oid::regclass as seq, a.attname, a.attidentity <> '' as is_identity, s.relname as seqname,
           pg_catalog.pg_get_serial_sequence(n.shadow, a.attname) as copy_seq, s.relacl
      from pg_catalog.pg_depend d join pg_catalog.pg_class s on s.oid = d.objid and s.relkind = 'S'
      join pg_catalog.pg_attribute a on a.attrelid = p_rel and a.attnum = d.refobjsubid
     where d.classid = 'pg_catalog.pg_class'::regclass and d.refobjid = p_rel and d.deptype in ('a', 'i')
  loop
    if r.is_identity then
      execute format('select setval(%L, last_value, is_called) from %s', r.copy_seq, r.seq);
      v_after := v_after || format('alter sequence %I.%I rename to %I;', v_nsp, split_part(r.copy_seq, '.', 2), r.seqname)
                         || case when r.relacl is not null then format('revoke all on sequence %I.%I from public;', v_nsp, r.seqname)
                                 || pg_temp.p2_grants_sql(r.relacl, 'sequence', format('%I.%I', v_nsp, r.seqname)) else '' end;
    else
      execute format('alter sequence %s owned by none', r.seq);
      v_after := v_after || format('alter sequence %s owned by %s.%I;', r.seq, v_name, r.attname);
    end if;
  end loop;
  -- views that read it: made again once the copy bears its name
  for r in
    select distinct v.oid::regclass as view, v.reloptions
      from pg_catalog.pg_depend d join pg_catalog.pg_rewrite w on w.oid = d.objid join pg_catalog.pg_class v on v.oid = w.ev_class
     where d.classid = 'pg_catalog.pg_rewrite'::regclass and d.refobjid = p_rel and v.relkind = 'v' and v.oid <> p_rel
  loop
    v_views := v_views || format('create or replace view %s%s as %s', r.view,
                                 case when r.reloptions is not null then format(' with (%s)', array_to_string(r.reloptions, ', ')) else '' end,
                                 rtrim(pg_catalog.pg_get_viewdef(r.view), ';')) || ';';
  end loop;
  -- a carrying copy's own triggers go; what they kept in legacy_data is the table's (the swap's transaction
  -- finishes the backfills, which keep legacy_data where something was stashed)
  if to_regprocedure(n.copy_function || '()') is not null then
    execute format('drop trigger if exists zz_p2_copy_carry on %s', n.shadow);
    execute format('drop trigger if exists zz_p2_copy_empty on %s', n.shadow);
    execute format('drop function %s()', n.copy_function);
    with moved as (delete from private.backfill_stashes as s where s.table_name = n.shadow returning 1)
    insert into private.backfill_stashes (table_name) select v_name from moved limit 1 on conflict do nothing;
  end if;
  -- the swap itself: the copy takes the name, the views follow it, the old table and its files go
  execute format('alter table %s rename to %I', v_name, 'p2_old_' || p_rel::oid);
  execute format('alter table %s set schema %I', n.shadow, v_nsp);
  execute format('alter table %I.%I rename to %I', v_nsp, 'p2_rewrite_' || p_rel::oid, c.relname);
  if v_views <> '' then
    execute v_views;
  end if;
  execute format('drop table %s', v_old);
  execute v_after;
  execute format('drop table %s', n.log);
  execute format('drop function %s()', n.log_function);
  return v_validate;
exception when lock_not_available then
  return null;
end
$fn$;

-- The rewrite by CLUSTER, where the online one cannot carry the table over (pg_temp.p2_rewrite_blocker) or
-- where truthsource.rewrite_method is 'cluster': ACCESS EXCLUSIVE for the whole rewrite. CLUSTER keeps every
-- row version that some transaction may still see (a snapshot of this database older than the removal, or
-- a transaction anywhere in the cluster that was already writing then): it waits (bounded) for those to
-- end first. False when they did not end in time (the table is left for a re-run, with a warning).
-- runbook: no-transaction
create or replace function pg_temp.p2_rewrite_by_cluster(p_table text, p_reason text, p_removed_in xid) returns boolean
language plpgsql
as $fn$
declare
  v_index text;
  v_blockers text;
  v_deadline constant timestamptz := clock_timestamp() + interval '60 seconds';
begin
  loop
    perform pg_catalog.pg_stat_clear_snapshot();
    select string_agg(b.who, '; ' order by b.who) into v_blockers
      from (select format('pid %s (%s, database %s, %s, %s, since %s: %s)', a.pid, a.backend_type, coalesce(a.datname, '-'),
                          coalesce(nullif(a.application_name, ''), '-'), a.state, coalesce(a.xact_start, a.backend_start),
                          left(a.query, 60)) as who
              from pg_catalog.pg_stat_activity as a
             where a.pid <> pg_catalog.pg_backend_pid()
               and (age(a.backend_xid) >= age(p_removed_in)
                    or (a.datname = current_database() and age(a.backend_xmin) >= age(p_removed_in)))
            union all
            select format('prepared transaction %s (database %s)', x.gid, x.database)
              from pg_catalog.pg_prepared_xacts as x
             where age(x.transaction) >= age(p_removed_in)) as b;
    exit when v_blockers is null or clock_timestamp() > v_deadline;
    perform pg_catalog.pg_sleep(0.2);
  end loop;
  if v_blockers is not null then
    raise warning '%: transactions % may still see its old row versions: not rewritten; re-run this file when they have ended',
      p_table, v_blockers;
    return false;
  end if;
  select ic.relname into v_index
    from pg_catalog.pg_index i join pg_catalog.pg_class ic on ic.oid = i.indexrelid
   where i.indrelid = to_regclass(p_table) and i.indisvalid and i.indisunique and i.indpred is null
   order by i.indisprimary desc, ic.relname
   limit 1;
  if v_index is null then
    raise warning '%: no index to CLUSTER on (%): run VACUUM FULL % yourself', p_table, p_reason, p_table;
    return false;
  end if;
  execute format('cluster %s using %I', p_table, v_index);
  execute format('alter table %s set without cluster', p_table);
  raise notice '%: rewritten by CLUSTER (%)', p_table, p_reason;
  return true;
end
$fn$;

-- ====================================================================================================
-- 2. Unique rules and ids checked, plaintext API keys hashed ahead, work queues, the tables' locks taken
-- ====================================================================================================

-- Unique rules and ids checked before the locks, by a read that lets the app go on: a duplicate stops the
-- phase here, before anything changes. A rule is checked on the values its columns will hold once the
-- legacy columns are carried (pg_temp.p2_future_value); one that holds already (a valid unique index on
-- its columns) is not read. Ids are checked where the primary key on id is still to be built (the logs
-- excepted: their concurrent build checks them). Nothing is read under the locks below.
-- runbook: no-transaction
do $$
declare
  r record;
  v_exprs text[];
  v_sample text;
  v_bad bigint;
begin
  for r in
    select x.tbl, x.rule, x.cols
      from (values ('organizations', 'organizations_slug_key', array['slug']),
                   ('organization_members', 'organization_members_organization_id_user_id_key', array['organization_id', 'user_id']),
                   ('products', 'products_organization_id_sku_key', array['organization_id', 'sku']),
                   ('inventory', 'inventory_product_id_location_key', array['product_id', 'location']),
                   ('api_keys', 'api_keys_key_hash_key', array['key_hash'])) as x (tbl, rule, cols)
     where to_regclass(format('public.%I', x.tbl)) is not null
  loop
    v_exprs := array(select pg_temp.p2_future_value(r.tbl, c) from unnest(r.cols) as c);
    continue when array_position(v_exprs, null) is not null
               or (v_exprs = array(select quote_ident(c) from unnest(r.cols) as c)
                   and pg_temp.p2_has_unique_index(format('public.%I', r.tbl)::regclass, r.cols));
    execute format('select string_agg(k, ''; '') from (select concat_ws('', '', %s) as k from public.%I where %s group by %s having count(*) > 1 limit 5) as d',
                   array_to_string(v_exprs, ', '), r.tbl,
                   (select string_agg(format('(%s) is not null', e), ' and ') from unnest(v_exprs) as e),
                   array_to_string(v_exprs, ', '))
      into v_sample;
    if v_sample is not null then
      raise exception 'public.%: cannot enforce % (unique %): duplicated values such as %', r.tbl, r.rule, array_to_string(r.cols, ', '), v_sample
        using errcode = 'unique_violation',
              hint = 'Resolve the duplicates (the preflight lists them), then re-run this file. Nothing was changed.';
    end if;
  end loop;
  for r in
    select c.oid::regclass as rel
      from pg_catalog.pg_class as c
     where c.relnamespace = 'public'::regnamespace
       and c.relname in ('organizations', 'profiles', 'organization_members', 'products', 'inventory', 'api_keys')
       and pg_temp.p2_column_type(c.oid, 'id') = 'uuid' and not pg_temp.p2_has_unique_index(c.oid, array['id'])
     order by c.relname
  loop
    execute format('select count(*) from (select id from %s group by id having count(*) > 1 or id is null) as d', r.rel) into v_bad;
    if v_bad > 0 then
      raise exception '%: cannot make id the primary key: % id value(s) are NULL or duplicated', r.rel, v_bad
        using errcode = 'unique_violation', hint = 'Give those rows distinct ids, then re-run this file. Nothing was changed.';
    end if;
  end loop;
end
$$;

-- Plaintext API keys hashed ahead, the expand half of section 5 (pgroll's way), once the unique rules above
-- hold: where public.api_keys still holds a plaintext column, key_hash and key_prefix are added if missing
-- (nullable: catalog only), a trigger fills them in what the app writes from now on (private.p2_key_hash(),
-- zz_p2_key_hash), the rows there are hashed in batches of pages, each its own short transaction, and the keys
-- are listed for the redaction (private.redaction_keys). Section 5 then drops the column under the lock with
-- nothing left to hash (at 10M, hashing 30,000 keys there held the tables a second). No value the app reads
-- changes: a legacy app does not know the two columns. A re-run resumes; where this could not finish (its
-- locks not granted in the runner's retries, or psql -f after an error), section 5 hashes the rest under the
-- lock as before.
-- runbook: no-transaction
do $$
declare
  v_cols text[];
  v_key text;
  v_new_key text;
  v_step constant bigint := greatest(coalesce(nullif(current_setting('truthsource.backfill_batch_pages', true), '')::bigint, 64), 1);
  v_pages bigint;
  v_page bigint := 0;
  v_quiet text[];
begin
  if to_regclass('public.api_keys') is null then
    return;
  end if;
  v_cols := pg_temp.p2_plaintext_key_columns();
  if v_cols = '{}' then
    return;
  end if;
  -- the first plaintext column that holds a key, hashed and prefixed as section 5 does
  v_key := format('coalesce(%s)', (select string_agg(format('%I', c), ', ') from unnest(v_cols) as c));
  v_new_key := format('coalesce(%s)', (select string_agg(format('new.%I', c), ', ') from unnest(v_cols) as c));
  -- added only where missing (ALTER TABLE takes its lock even when it adds nothing)
  if not exists (select 1 from pg_catalog.pg_attribute a where a.attrelid = 'public.api_keys'::regclass
                   and a.attname = 'key_hash' and not a.attisdropped) then
    alter table public.api_keys add column key_hash text;
  end if;
  if not exists (select 1 from pg_catalog.pg_attribute a where a.attrelid = 'public.api_keys'::regclass
                   and a.attname = 'key_prefix' and not a.attisdropped) then
    alter table public.api_keys add column key_prefix text;
  end if;
  if to_regclass('private.redaction_keys') is null then   -- section 2's table, needed here first
    create table private.redaction_keys (
      plaintext text not null,
      constraint redaction_keys_pkey primary key (plaintext)
    );
    revoke all on table private.redaction_keys from public, anon, authenticated, service_role;
  end if;
  -- what the app writes from now on: hashed where it wrote no hash; a new key written without a new hash
  -- gets its own
  execute format($f$
    create or replace function private.p2_key_hash() returns trigger
    language plpgsql
    set search_path = ''
    as $fn$
    begin
      if tg_op = 'UPDATE' and (%1$s) is distinct from (%2$s) and new.key_hash is not distinct from old.key_hash then
        new.key_hash := null;
        if new.key_prefix is not distinct from old.key_prefix then
          new.key_prefix := null;
        end if;
      end if;
      if %3$s is not null then
        new.key_hash := coalesce(new.key_hash, encode(pg_catalog.sha256(pg_catalog.convert_to(%3$s, 'UTF8')), 'hex'));
        new.key_prefix := coalesce(new.key_prefix, left(%3$s, least(12, length(%3$s) / 3)));
      end if;
      return new;
    end
    $fn$ $f$,
    (select string_agg(format('new.%I', c), ', ') from unnest(v_cols) as c),
    (select string_agg(format('old.%I', c), ', ') from unnest(v_cols) as c),
    v_new_key);
  revoke all on function private.p2_key_hash() from public, anon, authenticated, service_role;
  create or replace trigger zz_p2_key_hash before insert or update on public.api_keys
    for each row execute function private.p2_key_hash();
  alter table public.api_keys enable always trigger zz_p2_key_hash;
  commit;
  -- the rows there, in batches of pages (a TID range scan each), the table's other triggers quiet
  v_pages := pg_catalog.pg_relation_size('public.api_keys') / current_setting('block_size')::bigint;
  while v_page < v_pages loop
    call pg_temp.p2_yield_to_replicas();
    -- a row an app transaction holds is waited for up to 5 s, as in section 11's batches
    if current_setting('lock_timeout')::interval between interval '1 microsecond' and interval '5 seconds' then
      perform set_config('lock_timeout', '5s', true);
    end if;
    -- (phase 1's updated_at function does not know the migration's flag yet: it is quiet too)
    v_quiet := pg_temp.p2_triggers_off('public.api_keys');
    begin
      execute format('update public.api_keys
                         set key_hash = coalesce(key_hash, encode(sha256(convert_to(%1$s, ''UTF8'')), ''hex'')),
                             key_prefix = coalesce(key_prefix, left(%1$s, least(12, length(%1$s) / 3)))
                       where ctid >= ''(%2$s,0)''::tid and ctid < ''(%3$s,0)''::tid
                         and %1$s is not null and (key_hash is null or key_prefix is null)',
                     v_key, v_page, v_page + v_step);
    exception when unique_violation then
      null;   -- a key the app wrote since the check, alike another: section 5 meets it under the unique rule
    end;
    execute format('insert into private.redaction_keys (plaintext) select distinct k from public.api_keys as t,
                      unnest(array[%1$s]) as k
                     where t.ctid >= ''(%2$s,0)''::tid and t.ctid < ''(%3$s,0)''::tid and k is not null and k <> ''''
                    on conflict do nothing',
                   (select string_agg(format('t.%I::text', c), ', ') from unnest(v_cols) as c), v_page, v_page + v_step);
    perform pg_temp.p2_triggers_on('public.api_keys', v_quiet);
    commit;
    v_page := v_page + v_step;
  end loop;
end
$$;

-- The phase's work queues in private (no app table is locked for them, so they come before the locks):
-- what the body plans and the statements after its commit do, each emptied as its work is done.

-- the data changes the legacy shapes need, done after the commit in batches (section 11; empty at the end)
create table if not exists private.pending_backfills (
  ord bigint generated always as identity,
  table_name text not null,
  kind text not null check (kind in ('carry', 'split', 'convert', 'fill')),
  target text not null,
  source text not null,
  stash_key text not null,
  from_type text not null,
  to_type text not null,
  legacy_data_added boolean not null default false,
  dflt text,
  fill_expr text,
  rows_total bigint,
  rows_done bigint not null default 0,
  planned_at timestamptz not null default now(),
  constraint pending_backfills_pkey primary key (table_name, source)
);
-- (a database where an earlier release made it empty gets the new kinds and their columns)
alter table private.pending_backfills add column if not exists dflt text;
alter table private.pending_backfills add column if not exists fill_expr text;
do $$
begin
  if pg_catalog.pg_get_constraintdef((select c.oid from pg_catalog.pg_constraint c
                                       where c.conname = 'pending_backfills_kind_check'
                                         and c.conrelid = 'private.pending_backfills'::regclass)) !~ 'fill' then
    alter table private.pending_backfills drop constraint pending_backfills_kind_check;
    alter table private.pending_backfills add constraint pending_backfills_kind_check check (kind in ('carry', 'split', 'convert', 'fill'));
  end if;
end
$$;
revoke all on table private.pending_backfills from public, anon, authenticated, service_role;
comment on table private.pending_backfills is
  'Legacy columns that 001_core_schema.sql carries, converts or fills after its locked transaction, in batches (rows_done of rows_total), then swaps in.';

-- the tables whose backfill kept a value in legacy_data (written by the backfill trigger; the swap reads it)
create table if not exists private.backfill_stashes (
  table_name text not null,
  constraint backfill_stashes_pkey primary key (table_name)
);
revoke all on table private.backfill_stashes from public, anon, authenticated, service_role;
comment on table private.backfill_stashes is
  'Tables where 001_core_schema.sql kept a legacy value in legacy_data, so that legacy_data stays; empty at the end.';

-- the rows a batch could not write because they break a rule added NOT VALID: written in the table's short
-- locked transaction at the end of its step (pg_temp.p2_write_leftovers; empty at the end)
create table if not exists private.backfill_leftovers (
  table_name text not null,
  kind text not null check (kind in ('backfill', 'redaction')),
  row_ctid tid not null,
  constraint backfill_leftovers_pkey primary key (table_name, kind, row_ctid)
);
revoke all on table private.backfill_leftovers from public, anon, authenticated, service_role;
comment on table private.backfill_leftovers is
  'Rows of legacy shape that break a rule added NOT VALID, left by the batches of 001_core_schema.sql for a short locked step; empty at the end.';

-- tables to rewrite once this transaction has committed (the end of this file empties it)
create table if not exists private.pending_rewrites (
  table_name text not null,
  reason text not null,
  removed_in xid not null default pg_current_xact_id()::xid,
  requested_at timestamptz not null default now(),
  step text not null default 'planned' check (step in ('planned', 'trigger', 'copy', 'index', 'replay', 'validate')),
  pages_total bigint,
  pages_done bigint not null default 0,
  rows_replayed bigint not null default 0,
  validate text[] not null default '{}',
  carries boolean,
  constraint pending_rewrites_pkey primary key (table_name)
);
-- (a database where an earlier release made it empty gets the progress columns)
alter table private.pending_rewrites add column if not exists step text not null default 'planned';
alter table private.pending_rewrites add column if not exists pages_total bigint;
alter table private.pending_rewrites add column if not exists pages_done bigint not null default 0;
alter table private.pending_rewrites add column if not exists rows_replayed bigint not null default 0;
alter table private.pending_rewrites add column if not exists validate text[] not null default '{}';
alter table private.pending_rewrites add column if not exists carries boolean;
revoke all on table private.pending_rewrites from public, anon, authenticated, service_role;
comment on table private.pending_rewrites is
  'Tables that 001_core_schema.sql rewrites at its end (online, or by CLUSTER), after the transaction that removed plaintext secrets from them has committed, or copies with their conversions; step and progress of each.';

-- the plaintext keys whose copies are redacted after the commit (owner only; truncated when done)
create table if not exists private.redaction_keys (
  plaintext text not null,
  constraint redaction_keys_pkey primary key (plaintext)
);
revoke all on table private.redaction_keys from public, anon, authenticated, service_role;
comment on table private.redaction_keys is
  'Plaintext api keys whose copies 001_core_schema.sql redacts after its locked transaction; truncated when that is done.';

-- the redaction's batches per table (section 11): pages done of pages total, rows redacted
create table if not exists private.pending_redactions (
  table_name text not null,
  text_expr text not null,
  first_column text not null,
  prefix text not null,
  pages_total bigint,
  pages_done bigint not null default 0,
  rows_redacted bigint not null default 0,
  done_at timestamptz,
  constraint pending_redactions_pkey primary key (table_name)
);
revoke all on table private.pending_redactions from public, anon, authenticated, service_role;
comment on table private.pending_redactions is
  'Tables whose copies of plaintext api keys 001_core_schema.sql redacts after its locked transaction, in batches; empty at the end.';

-- no JIT in this transaction: compiling a plan costs hundreds of milliseconds on the key set's queries,
-- spent under the tables' locks for statements that run once (under psql -f: for this statement only)
do $$
begin
  perform set_config('jit', 'off', true);
end
$$;

-- the locks of the tables this phase converges, taken first and in one fixed order (parents before
-- children): the phase then never waits for a lock halfway through its work, so it cannot deadlock with
-- the app's transactions there. The wait is bounded by the runner's lock_timeout for all the locks
-- together, not for each (then retried whole): a table locked first is held while the others are waited
-- for (at 10M, 0.41 s of waiting for products behind the app's reads kept organizations locked 1.04 s).
-- Under psql -f (no lock_timeout) each statement commits on its own, and this one changes nothing.
do $$
declare
  v_table text;
  v_timeout constant text := current_setting('lock_timeout');
  v_until constant timestamptz := pg_catalog.clock_timestamp() + v_timeout::interval;
begin
  foreach v_table in array array['organizations', 'profiles', 'organization_members', 'products', 'inventory',
                                 'audit_logs', 'api_keys', 'security_events'] loop
    if to_regclass(format('public.%I', v_table)) is not null then
      if v_timeout::interval > interval '0' then   -- what is left of it; at least 1 ms (0 would wait for ever)
        perform set_config('lock_timeout', greatest(1, ceil(extract(epoch from v_until - pg_catalog.clock_timestamp()) * 1000))::bigint || 'ms', true);
      end if;
      execute format('lock table public.%I in access exclusive mode', v_table);
    end if;
  end loop;
  perform set_config('lock_timeout', v_timeout, true);
end
$$;

-- ====================================================================================================
-- 3. The core tables, as created on an empty database
-- ====================================================================================================

-- the core tables (as created on an empty database; existing tables are converged below)
create table if not exists public.organizations (
  id uuid not null default gen_random_uuid(),
  name text not null,
  slug text not null,
  settings jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint organizations_pkey primary key (id),
  constraint organizations_slug_key unique (slug)
);

-- profiles: one per auth user
create table if not exists public.profiles (
  id uuid not null,
  email text,
  full_name text,
  avatar_url text,
  organization_id uuid,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint profiles_pkey primary key (id)
);

-- organization_members: one row per organization and user
create table if not exists public.organization_members (
  id uuid not null default gen_random_uuid(),
  organization_id uuid not null,
  user_id uuid not null,
  role text not null default 'member'::text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint organization_members_pkey primary key (id),
  constraint organization_members_organization_id_user_id_key unique (organization_id, user_id)
);

-- products: the catalogue of an organization
create table if not exists public.products (
  id uuid not null default gen_random_uuid(),
  organization_id uuid not null,
  sku text not null,
  name text not null,
  description text,
  price numeric(12, 2) not null default 0,
  currency text not null default 'USD'::text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint products_pkey primary key (id),
  constraint products_organization_id_sku_key unique (organization_id, sku)
);

-- inventory: stock per product and location (quantities stay integer: legacy columns are, and widening rewrites)
create table if not exists public.inventory (
  id uuid not null default gen_random_uuid(),
  organization_id uuid not null,
  product_id uuid not null,
  location text not null default 'main'::text,
  -- squawk-ignore prefer-bigint-over-int
  quantity integer not null default 0,
  -- squawk-ignore prefer-bigint-over-int
  reserved_quantity integer not null default 0,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint inventory_pkey primary key (id),
  constraint inventory_product_id_location_key unique (product_id, location)
);

-- audit_logs: the append-only trail (id uuid on fresh installs; a legacy id keeps its type)
create table if not exists public.audit_logs (
  id uuid not null default gen_random_uuid(),
  organization_id uuid,
  user_id uuid,
  action text not null,
  table_name text,
  record_id uuid,
  old_data jsonb,
  new_data jsonb,
  ip_address inet,
  user_agent text,
  created_at timestamptz not null default now(),
  constraint audit_logs_pkey primary key (id)
);

-- api_keys: prefix and hash, never the key
create table if not exists public.api_keys (
  id uuid not null default gen_random_uuid(),
  organization_id uuid not null,
  name text not null,
  key_prefix text not null,
  key_hash text not null,
  scopes text[] not null default '{}'::text[],
  created_by uuid,
  last_used_at timestamptz,
  expires_at timestamptz,
  revoked_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint api_keys_pkey primary key (id),
  constraint api_keys_key_hash_key unique (key_hash)
);

-- security_events: append-only
create table if not exists public.security_events (
  id uuid not null default gen_random_uuid(),
  organization_id uuid,
  user_id uuid,
  event_type text not null,
  severity text not null default 'low'::text,
  ip_address inet,
  details jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  constraint security_events_pkey primary key (id)
);

-- ====================================================================================================
-- 4. Legacy shapes converged: policies, columns, carried data, primary keys
-- ====================================================================================================

-- legacy policies go first: the contract's replace them below (and they would pin legacy columns)
do $$
declare
  r record;
begin
  for r in
    select p.polname, p.polrelid::regclass as tbl, pg_catalog.pg_get_expr(p.polqual, p.polrelid) as qual
      from pg_catalog.pg_policy p
     where p.polrelid in ('public.organizations'::regclass, 'public.profiles'::regclass, 'public.organization_members'::regclass,
                          'public.products'::regclass, 'public.inventory'::regclass, 'public.audit_logs'::regclass,
                          'public.api_keys'::regclass, 'public.security_events'::regclass)
       and p.polname not in (
         'organizations_select_members', 'organizations_update_admins', 'organizations_delete_owners',
         'profiles_select_self_and_colleagues', 'profiles_insert_self', 'profiles_update_self',
         'organization_members_select_members', 'organization_members_insert_admins',
         'organization_members_update_admins', 'organization_members_delete_admins',
         'products_select_members', 'products_insert_admins', 'products_update_admins', 'products_delete_admins',
         'inventory_select_members', 'inventory_insert_admins', 'inventory_update_admins', 'inventory_delete_admins',
         'audit_logs_select_admins',
         'api_keys_select_admins', 'api_keys_insert_admins', 'api_keys_update_admins', 'api_keys_delete_admins',
         'security_events_select_admins')
     order by p.polrelid::regclass::text, p.polname
  loop
    raise notice 'legacy policy % on % (using %) dropped: the contract''s policies replace it', quote_ident(r.polname), r.tbl, coalesce(r.qual, '-');
    execute format('drop policy %I on %s', r.polname, r.tbl);
  end loop;
end
$$;

-- converge every core table that exists in another shape: columns added, renamed or planned (no row written)
do $$
declare
  v_timezone constant text := current_setting('TimeZone');
  v_added text[];
  v_quiet text[];
  v_table text;
begin
  -- timestamps without time zone are read as UTC
  perform set_config('TimeZone', 'UTC', true);
  foreach v_table in array array['organizations', 'profiles', 'organization_members', 'products', 'inventory',
                                 'audit_logs', 'api_keys', 'security_events'] loop
    v_quiet := pg_temp.p2_triggers_off(format('public.%I', v_table)::regclass);
    v_added := pg_temp.p2_converge_table(v_table);
    -- inventory without organization_id takes its product's
    if v_table = 'inventory' and 'organization_id' = any (v_added) then
      perform pg_temp.p2_plan_backfill('public.inventory', 'fill', 'organization_id', 'organization_id', 'organization_id', null,
                                       '(select p.organization_id from public.products as p where p.id = new.product_id)');
    end if;
    perform pg_temp.p2_triggers_on(format('public.%I', v_table)::regclass, v_quiet);
  end loop;
  perform set_config('TimeZone', v_timezone, true);
end
$$;

-- audit_logs.changes: {"old": ..., "new": ...} is split into old_data/new_data, anything else is new_data
-- (planned here, carried after the commit with the log's other legacy columns)
do $$
begin
  if pg_temp.p2_column_type('public.audit_logs', 'changes') = 'jsonb' then
    perform pg_temp.p2_plan_backfill('public.audit_logs', 'split', 'new_data', 'changes', 'changes');
  elsif pg_temp.p2_column_type('public.audit_logs', 'changes') is not null then
    perform pg_temp.p2_carry('public.audit_logs', 'new_data', 'changes', 'changes');
  end if;
end
$$;

-- api_keys: legacy active flags become revoked_at
do $$
declare
  v_col text;
  v_when constant text := 'coalesce(updated_at, created_at, now())';
  v_quiet text[] := pg_temp.p2_triggers_off('public.api_keys');
begin
  for v_col in
    select a.attname from pg_catalog.pg_attribute a
     where a.attrelid = 'public.api_keys'::regclass and a.attnum > 0 and not a.attisdropped
       and a.atttypid = 'boolean'::regtype and a.attname in ('active', 'is_active', 'enabled', 'is_enabled', 'revoked', 'is_revoked')
     order by a.attnum
  loop
    if v_col in ('revoked', 'is_revoked') then
      perform pg_temp.p2_stash('public.api_keys', v_col, v_col, format('%I is false and revoked_at is not null', v_col));
      execute format('update public.api_keys set revoked_at = %s where %I and revoked_at is null', v_when, v_col);
    else
      perform pg_temp.p2_stash('public.api_keys', v_col, v_col, format('%I and revoked_at is not null', v_col));
      execute format('update public.api_keys set revoked_at = %s where not %I and revoked_at is null', v_when, v_col);
    end if;
    raise notice 'public.api_keys: legacy flag % carried into revoked_at, then dropped', v_col;
    execute format('alter table public.api_keys drop column %I', v_col);
  end loop;
  perform pg_temp.p2_triggers_on('public.api_keys', v_quiet);
end
$$;

-- primary keys
do $$
declare
  v_table text;
begin
  foreach v_table in array array['organizations', 'profiles', 'organization_members', 'products', 'inventory',
                                 'audit_logs', 'api_keys', 'security_events'] loop
    perform pg_temp.p2_ensure_pk(v_table);
  end loop;
end
$$;

-- ====================================================================================================
-- 5. Plaintext API keys: hashed, prefixed, redacted wherever copied, dropped
-- ====================================================================================================

-- plaintext api keys: hashed, prefixed and dropped here; their copies are redacted after the commit
do $$
declare
  v_col text;
  v_secrets text[];
  v_mismatched bigint;
  v_quiet text[];
begin
  -- the trigger of the keys hashed ahead (section 2) has done its part, and reads the columns dropped below
  if to_regprocedure('private.p2_key_hash()') is not null then
    drop trigger if exists zz_p2_key_hash on public.api_keys;
    drop function private.p2_key_hash();
  end if;
  foreach v_col in array pg_temp.p2_plaintext_key_columns() loop
    execute format('select coalesce(array_agg(distinct %1$I), ''{}'') from public.api_keys where %1$I is not null and %1$I <> ''''', v_col)
      into v_secrets;
    insert into private.redaction_keys (plaintext) select x from unnest(v_secrets) as x on conflict do nothing;
    v_quiet := pg_temp.p2_triggers_off('public.api_keys');
    -- what section 2 could not hash ahead: one pass sets both (each only where it is missing); every row updated
    -- is a new row version, under the lock
    execute format('update public.api_keys
                       set key_hash = coalesce(key_hash, encode(sha256(convert_to(%1$I, ''UTF8'')), ''hex'')),
                           key_prefix = coalesce(key_prefix, left(%1$I, least(12, length(%1$I) / 3)))
                     where %1$I is not null and (key_hash is null or key_prefix is null)', v_col);
    execute format('select count(*) from public.api_keys
                     where %1$I is not null and key_hash <> encode(sha256(convert_to(%1$I, ''UTF8'')), ''hex'')', v_col)
      into v_mismatched;
    if v_mismatched > 0 then
      raise warning 'public.api_keys: % key(s) already had a key_hash that is not the sha256 of their plaintext: the stored key_hash is kept', v_mismatched;
    end if;
    perform pg_temp.p2_triggers_on('public.api_keys', v_quiet);
    execute format('alter table public.api_keys drop column %I', v_col);
    -- the rewrite happens at the end of this file, after this transaction has committed
    insert into private.pending_rewrites (table_name, reason)
    values ('public.api_keys'::regclass::text, 'old row versions hold plaintext api keys')
    on conflict (table_name) do update set reason = excluded.reason;
    raise warning 'public.api_keys: % plaintext key(s) in column % replaced by key_prefix and a sha256 key_hash; the column is dropped. Treat those keys as exposed and rotate them: WAL, replicas and earlier backups still hold them.',
      cardinality(v_secrets), v_col;
  end loop;
  -- copies of the keys in any text or json column of any public table: redacted after the commit
  if exists (select 1 from private.redaction_keys) then
    perform pg_temp.p2_plan_redaction();
  end if;
end
$$;

-- the planned backfills (section 4), as a trigger per table: from the commit on, what the app writes there is
-- carried. Created once api_keys' updates above are done, so that no row is carried under the locks: the
-- batches carry them after the commit (at 10M, the trigger firing for 25,000 keys took a third of the window)
do $$
declare
  v_table text;
begin
  for v_table in select distinct b.table_name from private.pending_backfills as b order by 1 loop
    perform pg_temp.p2_backfill_trigger(v_table::regclass);
  end loop;
end
$$;

-- ====================================================================================================
-- 6. Rules: unique, foreign keys, NOT NULL and checks
-- ====================================================================================================

-- unique rules (missing ones are built concurrently at the end of this file)
do $$
begin
  perform pg_temp.p2_ensure_unique('organizations', 'organizations_slug_key', array['slug']);
  perform pg_temp.p2_ensure_unique('organization_members', 'organization_members_organization_id_user_id_key', array['organization_id', 'user_id']);
  perform pg_temp.p2_ensure_unique('products', 'products_organization_id_sku_key', array['organization_id', 'sku']);
  perform pg_temp.p2_ensure_unique('inventory', 'inventory_product_id_location_key', array['product_id', 'location']);
  perform pg_temp.p2_ensure_unique('api_keys', 'api_keys_key_hash_key', array['key_hash']);
end
$$;

-- foreign keys (pg_temp.p2_foreign_keys(); the logs have none: they outlive what they name)
do $$
declare
  f record;
begin
  for f in select k.* from pg_temp.p2_foreign_keys() as k loop
    if f.col = any (pg_temp.p2_backfill_written(format('public.%I', f.tbl)::regclass)) then
      raise notice 'public.%: foreign key % is added once % is filled, at the end of this file', f.tbl, f.name, f.col;
      continue;
    end if;
    perform pg_temp.p2_ensure_fk(f.tbl, f.name, f.col, f.ref, f.refcol, f.on_delete);
  end loop;
end
$$;

-- rules: NOT NULL and checks named after what they enforce (pg_temp.p2_contract_checks()); legacy checks on
-- these tables are replaced. A column still to be converted keeps the rules its legacy type can state
-- meanwhile; the swap adds them again on the converted column (section 11). The rules on a column that the
-- batches write (carried into, filled) come with the swap: a batch writing a legacy row that breaks one
-- would be refused.
do $$
declare
  v_ours text[] := array(select c.name from pg_temp.p2_contract_checks() as c);
  s record;
  v_check text;
  r record;
begin
  for s in select sp.tbl, sp.col from pg_temp.p2_spec() as sp where sp.not_null order by sp.ord loop
    if s.col = any (pg_temp.p2_backfill_written(format('public.%I', s.tbl)::regclass)) then
      v_ours := v_ours || format('%s_%s_not_null_check', s.tbl, s.col);
      continue;
    end if;
    v_check := pg_temp.p2_ensure_not_null(s.tbl, s.col);
    if v_check is not null then
      v_ours := v_ours || v_check;
    end if;
  end loop;
  for r in
    select c.*, exists (select 1 from private.pending_backfills as b
                         where b.table_name = format('public.%I', c.tbl) and b.kind = 'convert' and b.source = any (c.cols)) as converting,
           c.cols && pg_temp.p2_backfill_written(format('public.%I', c.tbl)::regclass) as written
      from pg_temp.p2_contract_checks() as c
  loop
    continue when r.written;
    if not r.converting then
      perform pg_temp.p2_ensure_check(r.tbl, r.name, r.expr);
      continue;
    end if;
    begin
      perform pg_temp.p2_ensure_check(r.tbl, r.name, r.expr);
    exception when others then
      raise notice 'public.%: % waits for its column''s conversion (%)', r.tbl, r.name, sqlerrm;
    end;
  end loop;
  for r in
    select c.conname, c.conrelid::regclass as tbl, pg_catalog.pg_get_constraintdef(c.oid) as def
      from pg_catalog.pg_constraint c
     where c.contype = 'c' and c.conname <> all (v_ours)
       and c.conrelid in ('public.organizations'::regclass, 'public.profiles'::regclass, 'public.organization_members'::regclass,
                          'public.products'::regclass, 'public.inventory'::regclass, 'public.audit_logs'::regclass,
                          'public.api_keys'::regclass, 'public.security_events'::regclass)
     order by c.conrelid::regclass::text, c.conname
  loop
    raise notice 'legacy check % on % (%) dropped: the contract''s rules replace it', quote_ident(r.conname), r.tbl, r.def;
    execute format('alter table %s drop constraint %I', r.tbl, r.conname);
  end loop;
end
$$;

-- ====================================================================================================
-- 7. Indexes adopted or dropped (missing ones are built at the end)
-- ====================================================================================================

-- indexes: planned ones adopt an equivalent under their name; duplicates go (missing ones: end of file)
do $$
declare
  p record;
  r record;
begin
  for p in
    select x.name, x.tbl::regclass as tbl, x.def
      from (values
        ('profiles_organization_id_idx', 'public.profiles', 'USING btree (organization_id)'),
        ('organization_members_user_id_idx', 'public.organization_members', 'USING btree (user_id)'),
        ('inventory_organization_id_idx', 'public.inventory', 'USING btree (organization_id)'),
        ('api_keys_organization_id_idx', 'public.api_keys', 'USING btree (organization_id)'),
        ('api_keys_created_by_idx', 'public.api_keys', 'USING btree (created_by)'),
        ('audit_logs_organization_id_created_at_idx', 'public.audit_logs', 'USING btree (organization_id, created_at DESC)'),
        ('audit_logs_user_id_created_at_idx', 'public.audit_logs', 'USING btree (user_id, created_at DESC)'),
        ('audit_logs_record_id_idx', 'public.audit_logs', 'USING btree (record_id)'),
        ('audit_logs_created_at_idx', 'public.audit_logs', 'USING btree (created_at)'),
        ('security_events_organization_id_created_at_idx', 'public.security_events', 'USING btree (organization_id, created_at DESC)'),
        ('security_events_user_id_created_at_idx', 'public.security_events', 'USING btree (user_id, created_at DESC)'),
        ('security_events_ip_address_created_at_idx', 'public.security_events', 'USING btree (ip_address, created_at DESC)'),
        ('security_events_created_at_idx', 'public.security_events', 'USING btree (created_at)')
      ) as x (name, tbl, def)
  loop
    -- an index under the planned name that is something else (or an invalid leftover) is rebuilt
    for r in
      select ic.relname from pg_catalog.pg_class ic join pg_catalog.pg_index i on i.indexrelid = ic.oid
       where ic.relname = p.name and ic.relnamespace = 'public'::regnamespace
         and (i.indrelid <> p.tbl or not i.indisvalid or i.indisunique
              or substring(pg_catalog.pg_get_indexdef(ic.oid) from 'USING .*$') <> p.def)
    loop
      raise notice 'index % is not %: dropped, rebuilt at the end of this file', r.relname, p.def;
      execute format('drop index public.%I', r.relname);
    end loop;
    -- an equivalent plain index under another name is adopted
    if to_regclass(format('public.%I', p.name)) is null then
      for r in
        select ic.relname from pg_catalog.pg_index i join pg_catalog.pg_class ic on ic.oid = i.indexrelid
         where i.indrelid = p.tbl and i.indisvalid and not i.indisunique
           and not exists (select 1 from pg_catalog.pg_constraint c where c.conindid = i.indexrelid)
           and substring(pg_catalog.pg_get_indexdef(ic.oid) from 'USING .*$') = p.def
         order by ic.relname
         limit 1
      loop
        execute format('alter index public.%I rename to %I', r.relname, p.name);
        raise notice 'index % on % renamed to %', r.relname, p.tbl, p.name;
      end loop;
    end if;
  end loop;
  -- duplicate indexes on the core tables: a constraint's index, else a unique one, else the planned name stays
  for r in
    with idx as (
      select ic.relname, i.indrelid, i.indisunique,
             exists (select 1 from pg_catalog.pg_constraint c where c.conindid = i.indexrelid) as is_constraint,
             concat_ws('|', i.indrelid, i.indkey::text, i.indclass::text, i.indcollation::text, i.indoption::text,
                       coalesce(pg_catalog.pg_get_expr(i.indexprs, i.indrelid), ''),
                       coalesce(pg_catalog.pg_get_expr(i.indpred, i.indrelid), '')) as signature
        from pg_catalog.pg_index i join pg_catalog.pg_class ic on ic.oid = i.indexrelid
       where i.indisvalid
         and i.indrelid in ('public.organizations'::regclass, 'public.profiles'::regclass, 'public.organization_members'::regclass,
                            'public.products'::regclass, 'public.inventory'::regclass, 'public.audit_logs'::regclass,
                            'public.api_keys'::regclass, 'public.security_events'::regclass)
    ), ranked as (
      select idx.*, first_value(idx.relname) over w as kept, row_number() over w as n
        from idx
      window w as (partition by idx.signature
                   order by idx.is_constraint desc, idx.indisunique desc, idx.relname ~ '_(idx|key|pkey)$' desc, idx.relname)
    )
    select ranked.relname, ranked.indrelid::regclass as tbl, ranked.kept
      from ranked
     where ranked.n > 1 and not ranked.is_constraint
     order by ranked.indrelid::regclass::text, ranked.relname
  loop
    raise notice 'index % on % duplicates %: dropped', r.relname, r.tbl, r.kept;
    execute format('drop index public.%I', r.relname);
  end loop;
end
$$;

-- ====================================================================================================
-- 8. Policy helpers, append-only logs, updated_at triggers
-- ====================================================================================================

-- the helpers of the previous release returned sets (setof uuid); these return arrays. The old ones are
-- renamed <name>_setof first: the policies that call them (by oid) keep working until section 9 replaces
-- them, and the end of section 9 drops them.
do $$
declare
  r record;
begin
  for r in
    select p.oid, p.oid::regprocedure::text as fn, p.proname from pg_catalog.pg_proc as p
     where p.pronamespace = 'private'::regnamespace and p.pronargs = 0 and p.proretset
       and p.proname in ('member_org_ids', 'admin_org_ids', 'owner_org_ids', 'colleague_ids')
     order by 2
  loop
    execute format('alter function %s rename to %I', r.fn, r.proname || '_setof');
    raise notice 'policy helper % renamed %_setof: it returned a set, the new one returns an array', r.fn, r.proname;
  end loop;
end
$$;

-- what the policies call: SECURITY DEFINER, search_path pinned, in private (not exposed by the API).
-- They answer for the caller only (auth.uid() inside, no user argument): asked by anyone, they never
-- tell one user's organizations or colleagues to another. Policies call them once per query, as
-- `col = any ((select private.x())::uuid[])`: an InitPlan whose array becomes an index condition (the cast
-- makes it ANY over an array, not ANY over a subquery's rows, which would compare uuid with uuid[]). They
-- are PL/pgSQL so that the query inside is planned once per session (an SQL function is planned anew on
-- every call up to PostgreSQL 17: that was most of what RLS added to a short query).
create or replace function private.member_org_ids()
returns uuid[]
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
  return array(select m.organization_id from public.organization_members as m where m.user_id = (select auth.uid()));
end;
$$;

-- organizations the caller administers (owner or admin)
create or replace function private.admin_org_ids()
returns uuid[]
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
  return array(select m.organization_id from public.organization_members as m
                where m.user_id = (select auth.uid()) and m.role in ('owner', 'admin'));
end;
$$;

-- organizations the caller owns
create or replace function private.owner_org_ids()
returns uuid[]
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
  return array(select m.organization_id from public.organization_members as m
                where m.user_id = (select auth.uid()) and m.role = 'owner');
end;
$$;

-- users who share an organization with the caller
create or replace function private.colleague_ids()
returns uuid[]
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
  return array(select distinct other.user_id
                 from public.organization_members as mine
                 join public.organization_members as other on other.organization_id = mine.organization_id
                where mine.user_id = (select auth.uid()));
end;
$$;

-- what they are for
comment on function private.member_org_ids() is 'Organizations the calling user (auth.uid()) belongs to (any role), as an array; called by RLS policies.';
comment on function private.admin_org_ids() is 'Organizations the calling user (auth.uid()) is an owner or admin of, as an array; called by RLS policies.';
comment on function private.owner_org_ids() is 'Organizations the calling user (auth.uid()) owns, as an array; called by RLS policies.';
comment on function private.colleague_ids() is 'Users who share an organization with the calling user (auth.uid(), included), as an array; called by RLS policies.';

-- who may call them: authenticated (policies run as the caller) and service_role (which has no auth.uid(): nothing)
revoke all on function private.member_org_ids() from public, anon;
revoke all on function private.admin_org_ids() from public, anon;
revoke all on function private.owner_org_ids() from public, anon;
revoke all on function private.colleague_ids() from public, anon;
grant execute on function private.member_org_ids() to authenticated, service_role;
grant execute on function private.admin_org_ids() to authenticated, service_role;
grant execute on function private.owner_org_ids() to authenticated, service_role;
grant execute on function private.colleague_ids() to authenticated, service_role;

-- audit_logs and security_events are append-only for every role but the table owner
create or replace function private.append_only()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if pg_catalog.pg_has_role(current_user, (select c.relowner from pg_catalog.pg_class as c where c.oid = tg_relid), 'MEMBER') then
    return case when tg_op = 'DELETE' then old else new end;
  end if;
  raise exception '%.% is append-only: % refused for role %', tg_table_schema, tg_table_name, tg_op, current_user
    using errcode = 'insufficient_privilege',
          hint = 'Only the table owner changes or removes log rows (retention, anonymisation).';
end;
$$;
revoke all on function private.append_only() from public, anon, authenticated;
comment on function private.append_only() is 'Trigger function: refuses UPDATE, DELETE and TRUNCATE on a log table to every role but its owner.';

-- the append-only triggers on both log tables
create or replace trigger audit_logs_append_only before update or delete on public.audit_logs
  for each row execute function private.append_only();
create or replace trigger audit_logs_append_only_truncate before truncate on public.audit_logs
  for each statement execute function private.append_only();
create or replace trigger security_events_append_only before update or delete on public.security_events
  for each row execute function private.append_only();
create or replace trigger security_events_append_only_truncate before truncate on public.security_events
  for each statement execute function private.append_only();

-- updated_at triggers: one per table, calling the one function
create or replace trigger update_organizations_updated_at before update on public.organizations
  for each row execute function public.update_updated_at_column();
create or replace trigger update_profiles_updated_at before update on public.profiles
  for each row execute function public.update_updated_at_column();
create or replace trigger update_organization_members_updated_at before update on public.organization_members
  for each row execute function public.update_updated_at_column();
create or replace trigger update_products_updated_at before update on public.products
  for each row execute function public.update_updated_at_column();
create or replace trigger update_inventory_updated_at before update on public.inventory
  for each row execute function public.update_updated_at_column();
create or replace trigger update_api_keys_updated_at before update on public.api_keys
  for each row execute function public.update_updated_at_column();

-- ====================================================================================================
-- 9. Row-level security, policies and grants
-- ====================================================================================================

-- row-level security on every table in public
do $$
declare
  r record;
begin
  for r in
    select c.oid::regclass as tbl from pg_catalog.pg_class c
     where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p') and not c.relrowsecurity
     order by c.oid::regclass::text
  loop
    execute format('alter table %s enable row level security', r.tbl);
    raise notice 'row level security enabled on %', r.tbl;
  end loop;
end
$$;

-- policies: organizations (created by service_role; deleted by owners)
drop policy if exists organizations_select_members on public.organizations;
create policy organizations_select_members on public.organizations for select to authenticated
  using (id = any ((select private.member_org_ids())::uuid[]));
drop policy if exists organizations_update_admins on public.organizations;
create policy organizations_update_admins on public.organizations for update to authenticated
  using (id = any ((select private.admin_org_ids())::uuid[]))
  with check (id = any ((select private.admin_org_ids())::uuid[]));
drop policy if exists organizations_delete_owners on public.organizations;
create policy organizations_delete_owners on public.organizations for delete to authenticated
  using (id = any ((select private.owner_org_ids())::uuid[]));

-- policies: profiles (read by the user and colleagues, written by the user)
drop policy if exists profiles_select_self_and_colleagues on public.profiles;
create policy profiles_select_self_and_colleagues on public.profiles for select to authenticated
  using (id = (select auth.uid()) or id = any ((select private.colleague_ids())::uuid[]));
drop policy if exists profiles_insert_self on public.profiles;
create policy profiles_insert_self on public.profiles for insert to authenticated
  with check (id = (select auth.uid()));
drop policy if exists profiles_update_self on public.profiles;
create policy profiles_update_self on public.profiles for update to authenticated
  using (id = (select auth.uid()))
  with check (id = (select auth.uid()));

-- policies: organization_members
drop policy if exists organization_members_select_members on public.organization_members;
create policy organization_members_select_members on public.organization_members for select to authenticated
  using (organization_id = any ((select private.member_org_ids())::uuid[]));
drop policy if exists organization_members_insert_admins on public.organization_members;
create policy organization_members_insert_admins on public.organization_members for insert to authenticated
  with check (organization_id = any ((select private.admin_org_ids())::uuid[]));
drop policy if exists organization_members_update_admins on public.organization_members;
create policy organization_members_update_admins on public.organization_members for update to authenticated
  using (organization_id = any ((select private.admin_org_ids())::uuid[]))
  with check (organization_id = any ((select private.admin_org_ids())::uuid[]));
drop policy if exists organization_members_delete_admins on public.organization_members;
create policy organization_members_delete_admins on public.organization_members for delete to authenticated
  using (organization_id = any ((select private.admin_org_ids())::uuid[]));

-- policies: products
drop policy if exists products_select_members on public.products;
create policy products_select_members on public.products for select to authenticated
  using (organization_id = any ((select private.member_org_ids())::uuid[]));
drop policy if exists products_insert_admins on public.products;
create policy products_insert_admins on public.products for insert to authenticated
  with check (organization_id = any ((select private.admin_org_ids())::uuid[]));
drop policy if exists products_update_admins on public.products;
create policy products_update_admins on public.products for update to authenticated
  using (organization_id = any ((select private.admin_org_ids())::uuid[]))
  with check (organization_id = any ((select private.admin_org_ids())::uuid[]));
drop policy if exists products_delete_admins on public.products;
create policy products_delete_admins on public.products for delete to authenticated
  using (organization_id = any ((select private.admin_org_ids())::uuid[]));

-- policies: inventory
drop policy if exists inventory_select_members on public.inventory;
create policy inventory_select_members on public.inventory for select to authenticated
  using (organization_id = any ((select private.member_org_ids())::uuid[]));
drop policy if exists inventory_insert_admins on public.inventory;
create policy inventory_insert_admins on public.inventory for insert to authenticated
  with check (organization_id = any ((select private.admin_org_ids())::uuid[]));
drop policy if exists inventory_update_admins on public.inventory;
create policy inventory_update_admins on public.inventory for update to authenticated
  using (organization_id = any ((select private.admin_org_ids())::uuid[]))
  with check (organization_id = any ((select private.admin_org_ids())::uuid[]));
drop policy if exists inventory_delete_admins on public.inventory;
create policy inventory_delete_admins on public.inventory for delete to authenticated
  using (organization_id = any ((select private.admin_org_ids())::uuid[]));

-- policies: audit_logs (read by admins and owners; written by triggers and service_role only)
drop policy if exists audit_logs_select_admins on public.audit_logs;
create policy audit_logs_select_admins on public.audit_logs for select to authenticated
  using (organization_id = any ((select private.admin_org_ids())::uuid[]));

-- policies: api_keys (admins and owners only)
drop policy if exists api_keys_select_admins on public.api_keys;
create policy api_keys_select_admins on public.api_keys for select to authenticated
  using (organization_id = any ((select private.admin_org_ids())::uuid[]));
drop policy if exists api_keys_insert_admins on public.api_keys;
create policy api_keys_insert_admins on public.api_keys for insert to authenticated
  with check (organization_id = any ((select private.admin_org_ids())::uuid[]));
drop policy if exists api_keys_update_admins on public.api_keys;
create policy api_keys_update_admins on public.api_keys for update to authenticated
  using (organization_id = any ((select private.admin_org_ids())::uuid[]))
  with check (organization_id = any ((select private.admin_org_ids())::uuid[]));
drop policy if exists api_keys_delete_admins on public.api_keys;
create policy api_keys_delete_admins on public.api_keys for delete to authenticated
  using (organization_id = any ((select private.admin_org_ids())::uuid[]));

-- policies: security_events (read by admins and owners; written by log_security_event() and service_role)
drop policy if exists security_events_select_admins on public.security_events;
create policy security_events_select_admins on public.security_events for select to authenticated
  using (organization_id = any ((select private.admin_org_ids())::uuid[]));

-- grants: anon nothing; authenticated what RLS then narrows (never TRUNCATE, nor MAINTAIN on 17+); the logs append-only
revoke all on table public.organizations, public.profiles, public.organization_members, public.products,
  public.inventory, public.audit_logs, public.api_keys, public.security_events from anon, authenticated, service_role;
grant select, insert, update, delete on table public.organizations, public.profiles, public.organization_members,
  public.products, public.inventory, public.api_keys to authenticated;
grant select, insert, update, delete on table public.organizations, public.profiles, public.organization_members,
  public.products, public.inventory, public.api_keys to service_role;
revoke insert, update, delete on table public.audit_logs, public.security_events from authenticated;
grant select on table public.audit_logs, public.security_events to authenticated;
revoke update, delete, truncate on table public.audit_logs, public.security_events from service_role;
grant select, insert on table public.audit_logs, public.security_events to service_role;

-- the policy helpers of earlier releases, dropped now that the policies above call this release's: those
-- that took a user argument (they answered for anyone) and the previous release's set-returning ones
-- (renamed <name>_setof in section 8). Never CASCADE: an object of someone else's that still calls one
-- stops the phase, named, so that it is re-pointed rather than silently dropped.
do $$
declare
  r record;
  v_users text;
begin
  for r in
    select p.oid, p.oid::regprocedure::text as fn, p.proname, p.proname like '%\_setof' as is_set
      from pg_catalog.pg_proc as p
     where p.pronamespace = 'private'::regnamespace
       and ((p.proname in ('member_org_ids', 'admin_org_ids', 'owner_org_ids', 'colleague_ids')
             and p.pronargs = 1 and p.proargtypes[0] = 'uuid'::regtype)
         or (p.proname in ('member_org_ids_setof', 'admin_org_ids_setof', 'owner_org_ids_setof', 'colleague_ids_setof')
             and p.pronargs = 0 and p.proretset))
     order by 4, 2
  loop
    select string_agg(pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid), ', ' order by 1)
      into v_users
      from pg_catalog.pg_depend as d
     where d.refclassid = 'pg_catalog.pg_proc'::regclass and d.refobjid = r.oid and d.deptype = 'n';
    if v_users is not null and r.is_set then
      raise exception 'the previous policy helper % (a set) is still called by %', r.fn, v_users
        using errcode = 'dependent_objects_still_exist',
              hint = format('Make them call private.%s() as `col = any ((select private.%s())::uuid[])`, then re-run this phase.',
                            left(r.proname, -6), left(r.proname, -6));
    elsif v_users is not null then
      raise exception 'the old helper % answers for any user it is asked about, and % still call(s) it', r.fn, v_users
        using errcode = 'dependent_objects_still_exist',
              hint = format('Make them call %s (the caller''s own answer, from auth.uid()), then re-run this phase.',
                            replace(r.fn, '(uuid)', '()'));
    end if;
    execute format('drop function %s', r.fn);
    raise notice 'dropped the % policy helper % (%)', case when r.is_set then 'previous' else 'old' end, r.fn,
      case when r.is_set then 'it returned a set' else 'it answered for any user' end;
  end loop;
end
$$;

-- the legacy overloads that 000_core_functions.sql kept (as private.retired_*) for the legacy policies
-- calling them: those on the core tables are gone above; a policy elsewhere that still calls one becomes
-- a fail-closed placeholder of the same name, command and roles (access only narrows); then they go.
do $$
declare
  r record;
  pol record;
begin
  for r in
    select p.oid, p.oid::regprocedure::text as fn from pg_catalog.pg_proc as p
     where p.pronamespace = 'private'::regnamespace and p.proname like 'retired\_%'
       and pg_catalog.obj_description(p.oid, 'pg_proc') like 'Retired by 000_core_functions.sql:%'
     order by 2
  loop
    for pol in
      select p.polname, p.polrelid::regclass as tbl, p.polpermissive, p.polcmd,
             (select string_agg(case when x = 0 then 'public' else quote_ident(x::regrole::text) end, ', ' order by x)
                from unnest(p.polroles) as x) as roles
        from pg_catalog.pg_depend as d join pg_catalog.pg_policy as p on p.oid = d.objid
       where d.classid = 'pg_catalog.pg_policy'::regclass and d.refclassid = 'pg_catalog.pg_proc'::regclass
         and d.refobjid = r.oid and d.deptype = 'n'
       order by 1, 2
    loop
      raise notice 'policy % on % calls %, which is retired: replaced by a fail-closed placeholder',
        quote_ident(pol.polname), pol.tbl, r.fn;
      execute format('drop policy %I on %s', pol.polname, pol.tbl);
      execute format('create policy %I on %s as %s for %s to %s %s',
        pol.polname, pol.tbl,
        case when pol.polpermissive then 'permissive' else 'restrictive' end,
        case pol.polcmd when 'r' then 'select' when 'a' then 'insert' when 'w' then 'update' when 'd' then 'delete' else 'all' end,
        pol.roles,
        case pol.polcmd when 'r' then 'using (false)' when 'd' then 'using (false)'
                        when 'a' then 'with check (false)' else 'using (false) with check (false)' end);
    end loop;
    execute format('drop function %s', r.fn);
    raise notice 'dropped % (a legacy overload that 000_core_functions.sql retired)', r.fn;
  end loop;
end
$$;

-- ====================================================================================================
-- 10. Legacy triggers named, documentation in the catalog
-- ====================================================================================================

-- legacy triggers of other purposes stay on the core tables: named, so that the DBA checks them
do $$
declare
  r record;
begin
  for r in
    select t.tgrelid::regclass as tbl, t.tgname, t.tgfoid::regprocedure as fn
      from pg_catalog.pg_trigger as t
      join pg_catalog.pg_proc as p on p.oid = t.tgfoid
     where not t.tgisinternal
       and t.tgrelid in ('public.organizations'::regclass, 'public.profiles'::regclass, 'public.organization_members'::regclass,
                         'public.products'::regclass, 'public.inventory'::regclass, 'public.audit_logs'::regclass,
                         'public.api_keys'::regclass, 'public.security_events'::regclass)
       and p.pronamespace <> 'private'::regnamespace
       and t.tgfoid <> 'public.update_updated_at_column()'::regprocedure
     order by t.tgrelid::regclass::text, t.tgname
  loop
    raise warning 'legacy trigger % on % (calls %) is kept: check that it still works with the contract''s columns (verify_data_integrity() lists it)',
      quote_ident(r.tgname), r.tbl, r.fn;
  end loop;
end
$$;

-- documentation in the catalog
comment on table public.organizations is 'Tenants. Created by service_role; read by members, changed by admins and owners, deleted by owners.';
comment on table public.profiles is 'One per auth user: read by the user and colleagues, written by the user.';
comment on table public.organization_members is 'Who belongs to which organization, as owner, admin, member or viewer (one row per organization and user).';
comment on table public.products is 'Catalogue per organization; SKU unique within the organization and valid per validate_sku().';
comment on table public.inventory is 'Stock per product and location: quantity >= 0, 0 <= reserved_quantity <= quantity.';
comment on table public.audit_logs is 'Append-only trail of changes; read by admins and owners; no foreign keys (it outlives what it names).';
comment on table public.api_keys is 'API keys: key_prefix to recognise a key, key_hash = sha256 hex of the key; the plaintext is never stored.';
comment on table public.security_events is 'Append-only security events (severity low, medium, high or critical); read by admins and owners.';

-- ====================================================================================================
-- 11. After the commit (no transaction): redaction and backfills in batches, swaps, rewrites, indexes, rules
-- ====================================================================================================

-- Every batch loop below waits between two batches, after the batch's commit, while
-- private.replication_backlog() (000_core_functions.sql) names a streaming replica further behind than
-- truthsource.max_replica_lag seconds (10 by default), or WAL archiving behind: it says 'paused: <why>' and
-- sleeps a second at a time (wait event PgSleep) in a transaction of its own that holds no lock and no row,
-- then goes on. Where nothing streams, nothing waits.

-- copies of plaintext keys redacted in batches of pages (a TID range scan each), each batch its own short
-- transaction: the rows of a batch that hold a copy go through the table's zz_p2_redact trigger, which also
-- redacts what the app writes meanwhile. pages_done in private.pending_redactions is where a re-run
-- resumes. The tables that held a copy are rewritten below; the triggers, the functions and the keys go
-- once the indexes are built (dropping a trigger takes ACCESS EXCLUSIVE: the app's queries are fast by
-- then). The batch size (pages) is truthsource.backfill_batch_pages, 64 by default.
-- runbook: no-transaction
do $$
declare
  r record;
  v_step constant bigint := greatest(coalesce(nullif(current_setting('truthsource.backfill_batch_pages', true), '')::bigint, 64), 1);
  v_pages bigint;
  v_page bigint;
  v_count bigint;
  v_quiet text[];
  v_name text;
  v_range text;
  v_table text;
  v_tries integer;
  v_timeout constant text := pg_temp.p2_lock_wait();
begin
  for r in select p.table_name::regclass as rel, p.* from private.pending_redactions as p where p.done_at is null order by 1 loop
    v_table := (select format('%I.%I', n.nspname, c.relname) from pg_catalog.pg_class c
                  join pg_catalog.pg_namespace n on n.oid = c.relnamespace where c.oid = r.rel);
    v_pages := pg_catalog.pg_relation_size(r.rel) / current_setting('block_size')::bigint;
    update private.pending_redactions as p set pages_total = v_pages where p.table_name = r.table_name;
    commit;
    v_page := r.pages_done;
    while v_page < v_pages loop
      call pg_temp.p2_yield_to_replicas();
      -- the migration's own writes: updated_at kept (the trigger above sees the flag), the log's
      -- append-only rule lets the owner through; any other trigger of the table is quiet for this batch
      perform set_config('truthsource.migration_write', 'on', true);
      -- an app transaction may hold one of the batch's rows for a while: a row lock, not a table lock
      -- (the app does not queue behind the batch for the table), so the batch waits up to 5 s for it
      if current_setting('lock_timeout')::interval between interval '1 microsecond' and interval '5 seconds' then
        perform set_config('lock_timeout', '5s', true);
      end if;
      select coalesce(array_agg(t.tgname::text), '{}') into v_quiet from pg_catalog.pg_trigger t
       where t.tgrelid = r.rel and not t.tgisinternal and t.tgenabled = 'O' and t.tgname not like 'zz\_p2\_%'
         and t.tgfoid not in ('public.update_updated_at_column()'::regprocedure, 'private.append_only()'::regprocedure);
      foreach v_name in array v_quiet loop
        execute format('alter table %s disable trigger %I', r.rel, v_name);
      end loop;
      v_range := format('t.ctid >= ''(%s,0)''::tid and t.ctid < ''(%s,0)''::tid and strpos(%s, %L) > 0 and private.p2_secret_copies(%s) is not null',
                        v_page, v_page + v_step, r.text_expr, r.prefix, r.text_expr);
      begin
        execute format('update %1$s as t set %2$I = t.%2$I where %3$s', r.rel, r.first_column, v_range);
        get diagnostics v_count = row_count;
      exception when check_violation or not_null_violation or foreign_key_violation then
        -- a legacy row that breaks a rule added NOT VALID cannot be written: kept for a short locked step below
        execute format('insert into private.backfill_leftovers (table_name, kind, row_ctid) select %L, ''redaction'', t.ctid from %s as t
                         where %s on conflict do nothing', v_table, r.rel, v_range);
        v_count := 0;
      end;
      foreach v_name in array v_quiet loop
        execute format('alter table %s enable trigger %I', r.rel, v_name);
      end loop;
      update private.pending_redactions as p set pages_done = v_page + v_step, rows_redacted = p.rows_redacted + v_count
       where p.table_name = r.table_name;
      if v_count > 0 then
        insert into private.pending_rewrites (table_name, reason) values (r.table_name, 'old row versions hold plaintext api keys')
        on conflict (table_name) do update set reason = excluded.reason, removed_in = excluded.removed_in,
                                                            requested_at = excluded.requested_at;
      end if;
      commit;
      v_page := v_page + v_step;
    end loop;
    -- the rows a batch left: written in one short transaction under the table's lock, asked for again
    -- after a pause while the app holds it
    v_tries := 0;
    while exists (select 1 from private.backfill_leftovers as l where l.table_name = v_table and l.kind = 'redaction') loop
      perform set_config('lock_timeout', v_timeout, true);
      perform set_config('truthsource.migration_write', 'on', true);
      v_count := pg_temp.p2_locked_leftovers(r.rel, 'redaction', format('%1$I = %1$I', r.first_column),
                                             format('private.p2_secret_copies(%s) is not null', r.text_expr));
      if v_count is not null then
        update private.pending_redactions as p set rows_redacted = p.rows_redacted + v_count where p.table_name = r.table_name;
        insert into private.pending_rewrites (table_name, reason) values (r.table_name, 'old row versions hold plaintext api keys')
        on conflict (table_name) do update set reason = excluded.reason, removed_in = excluded.removed_in,
                                                            requested_at = excluded.requested_at;
      else
        v_tries := v_tries + 1;
        perform pg_temp.p2_lock_not_granted(r.rel, v_tries);
      end if;
      commit;
      if v_count is null then
        perform pg_catalog.pg_sleep(least(v_tries, 10) * 0.1);
      end if;
    end loop;
    update private.pending_redactions as p set done_at = clock_timestamp() where p.table_name = r.table_name;
    commit;
  end loop;
  for r in select p.table_name, p.rows_redacted from private.pending_redactions as p where p.rows_redacted > 0 order by 1 loop
    raise notice '%: plaintext api key(s) redacted in % row(s)', r.table_name, r.rows_redacted;
  end loop;
end
$$;

-- the primary keys on id still to build (a legacy table without one, a log without one, a table whose key
-- was on other columns): the unique index built without blocking writes, attached as the key at the end of
-- this file once id is NOT NULL (duplicated ids were refused before the locks; a log's stop the build here).
-- Built before the backfills: a log's online rewrite identifies rows by it, and carries the log as it copies
-- runbook: no-transaction
create unique index concurrently if not exists organizations_pkey on public.organizations (id);
-- runbook: no-transaction
create unique index concurrently if not exists profiles_pkey on public.profiles (id);
-- runbook: no-transaction
create unique index concurrently if not exists organization_members_pkey on public.organization_members (id);
-- runbook: no-transaction
create unique index concurrently if not exists products_pkey on public.products (id);
-- runbook: no-transaction
create unique index concurrently if not exists inventory_pkey on public.inventory (id);
-- runbook: no-transaction
create unique index concurrently if not exists audit_logs_pkey on public.audit_logs (id);
-- runbook: no-transaction
create unique index concurrently if not exists api_keys_pkey on public.api_keys (id);
-- runbook: no-transaction
create unique index concurrently if not exists security_events_pkey on public.security_events (id);

-- the unique rules missing on tables that hold rows, built (without blocking writes) before the data work:
-- the app's lookups by them (an organization's products by sku, a member by organization and user) stop
-- reading whole tables while the backfills and rewrites below share the server with it (duplicates were
-- refused before the locks); attached as constraints further down, where they are built again if a swap
-- replaced one of their columns (a conversion by a hidden column)
-- runbook: no-transaction
create unique index concurrently if not exists organizations_slug_key on public.organizations (slug);
-- runbook: no-transaction
create unique index concurrently if not exists organization_members_organization_id_user_id_key
  on public.organization_members (organization_id, user_id);
-- runbook: no-transaction
create unique index concurrently if not exists products_organization_id_sku_key on public.products (organization_id, sku);
-- runbook: no-transaction
create unique index concurrently if not exists inventory_product_id_location_key on public.inventory (product_id, location);
-- runbook: no-transaction
create unique index concurrently if not exists api_keys_key_hash_key on public.api_keys (key_hash);

-- the planned backfills (carried, converted and filled columns, section 4) in batches of pages (a TID range
-- scan each, PostgreSQL 14+), each batch its own short transaction: the app goes on meanwhile (its writes
-- wait at most one batch), and the rows it writes go through the trigger. rows_done of rows_total in
-- private.pending_backfills shows the progress; marked rows are not done twice, so a re-run resumes where an
-- interrupted one stopped. updated_at stays as it was. The batch size (pages) is
-- truthsource.backfill_batch_pages, 64 by default.
-- runbook: no-transaction
do $$
declare
  b record;
  v_step constant bigint := greatest(coalesce(nullif(current_setting('truthsource.backfill_batch_pages', true), '')::bigint, 64), 1);
  v_pages bigint;
  v_page bigint;
  v_count bigint;
  v_quiet text[];
  v_name text;
  v_rules text;
  v_range text;
begin
  perform pg_temp.p2_plan_copies();
  commit;
  for b in select distinct p.table_name::regclass as rel, p.table_name from private.pending_backfills as p order by 1 loop
    if pg_temp.p2_carried_in_rewrite(b.rel) then
      raise notice '%: carried as it is rewritten online below (one pass over the table instead of two)', b.rel;
      commit;
      continue;
    end if;
    -- the planner's row count, or a count where the table was never analyzed
    select nullif(greatest(c.reltuples, 0), 0)::bigint into v_count from pg_catalog.pg_class c where c.oid = b.rel;
    if v_count is null then
      execute format('select count(*) from %s', b.rel) into v_count;
    end if;
    update private.pending_backfills as p set rows_total = v_count where p.table_name::regclass = b.rel and p.rows_total is null;
    commit;
    v_pages := pg_catalog.pg_relation_size(b.rel) / current_setting('block_size')::bigint;
    v_page := 0;
    while v_page < v_pages loop
      call pg_temp.p2_yield_to_replicas();
      -- the migration's own writes (updated_at kept by the trigger); the log's append-only rule lets the
      -- owner through; any other trigger of the table is quiet for this batch; a row an app transaction
      -- holds is waited for up to 5 s, as in the redaction's batches
      perform set_config('truthsource.migration_write', 'on', true);
      if current_setting('lock_timeout')::interval between interval '1 microsecond' and interval '5 seconds' then
        perform set_config('lock_timeout', '5s', true);
      end if;
      select coalesce(array_agg(t.tgname::text), '{}') into v_quiet from pg_catalog.pg_trigger t
       where t.tgrelid = b.rel and not t.tgisinternal and t.tgenabled = 'O' and t.tgname not like 'zz\_p2\_%'
         and t.tgfoid not in ('public.update_updated_at_column()'::regprocedure, 'private.append_only()'::regprocedure);
      foreach v_name in array v_quiet loop
        execute format('alter table %s disable trigger %I', b.rel, v_name);
      end loop;
      -- a legacy row that breaks a rule added NOT VALID cannot be written: kept for the swap (a leftover)
      v_rules := pg_temp.p2_rules_hold(b.rel);
      v_range := format('ctid >= ''(%s,0)''::tid and ctid < ''(%s,0)''::tid and p2_carried is not true', v_page, v_page + v_step);
      begin
        execute format('update %s set p2_carried = true where %s and %s', b.rel, v_range, v_rules);
        get diagnostics v_count = row_count;
        if v_rules <> 'true' then
          execute format('insert into private.backfill_leftovers (table_name, kind, row_ctid) select %L, ''backfill'', ctid from %s
                           where %s and not (%s) on conflict do nothing', b.table_name, b.rel, v_range, v_rules);
        end if;
      exception when check_violation or not_null_violation or foreign_key_violation then
        execute format('insert into private.backfill_leftovers (table_name, kind, row_ctid) select %L, ''backfill'', ctid from %s
                         where %s on conflict do nothing', b.table_name, b.rel, v_range);
        v_count := 0;
      end;
      foreach v_name in array v_quiet loop
        execute format('alter table %s enable trigger %I', b.rel, v_name);
      end loop;
      update private.pending_backfills as p set rows_done = p.rows_done + v_count where p.table_name::regclass = b.rel;
      commit;
      v_page := v_page + v_step;
    end loop;
  end loop;
end
$$;

-- each table's backfills finished in one short transaction under its lock (pg_temp.p2_finish_backfills:
-- nothing is read there): legacy columns dropped, converted columns swapped in. The lock is waited for at
-- most lock_timeout (500 ms at most) at a time, and asked again after a pause, so the app never queues
-- behind this step for longer. The swapped-in columns then get their statistics.
-- runbook: no-transaction
do $$
declare
  b record;
  v_timeout constant text := pg_temp.p2_lock_wait();
  v_tries integer;
  v_converted boolean;
begin
  for b in select p.table_name::regclass as rel, bool_or(p.kind = 'convert') as converts
             from private.pending_backfills as p group by p.table_name order by 1 loop
    continue when pg_temp.p2_carried_in_rewrite(b.rel);   -- finished in its swap's transaction, below
    v_tries := 0;
    loop
      perform set_config('lock_timeout', v_timeout, true);
      exit when pg_temp.p2_finish_backfills(b.rel);
      v_tries := v_tries + 1;
      perform pg_temp.p2_lock_not_granted(b.rel, v_tries);
      commit;
      perform pg_catalog.pg_sleep(least(v_tries, 10) * 0.1);
    end loop;
    v_converted := b.converts;
    commit;
    if v_converted then
      execute format('analyze %s', b.rel);
      commit;
    end if;
  end loop;
end
$$;

-- Tables that held plaintext keys rewritten now that their old row versions are dead (and the tables copied
-- with their conversions, pg_temp.p2_carried_in_rewrite), online by default
-- (pg_temp.p2_rewrite_*, section 1: a copy, a log of the app's writes, batches of pages, the log replayed,
-- then one short transaction under the table's lock whose work follows what the app wrote since the last
-- batch, not the table's size), or by CLUSTER under the table's lock where the online way cannot carry the
-- table over exactly (named in a notice) or where truthsource.rewrite_method is 'cluster'. Every step
-- commits and is kept in private.pending_rewrites (step; pages_done of pages_total; rows_replayed), so a
-- re-run resumes where an interrupted run stopped; a copy that no longer matches its table is made again.
-- runbook: no-transaction
do $$
declare
  r record;
  n record;
  v_rel regclass;
  v_method constant text := pg_temp.p2_rewrite_method();
  v_step constant bigint := greatest(coalesce(nullif(current_setting('truthsource.backfill_batch_pages', true), '')::bigint, 64), 1);
  v_timeout constant text := pg_temp.p2_lock_wait();
  v_stage text;
  v_why text;
  v_tries integer;
  v_page bigint;
  v_pages bigint;
  v_count bigint;
  v_validate text[];
  i record;
begin
  for r in select p.* from private.pending_rewrites as p order by p.table_name loop
    v_rel := to_regclass(r.table_name);
    v_stage := r.step;
    if v_rel is null then
      delete from private.pending_rewrites as p where p.table_name = r.table_name;
      commit;
      continue;
    end if;
    n := pg_temp.p2_rewrite_names(v_rel);
    v_why := case when v_method = 'cluster' then 'truthsource.rewrite_method is cluster' else pg_temp.p2_rewrite_blocker(v_rel) end;
    if v_stage = 'planned' and v_why is not null and r.carries then
      -- (its table changed since its backfills were left to the copy: a re-run carries them in batches)
      update private.pending_rewrites as p set carries = false where p.table_name = r.table_name;
      commit;
      raise exception '%: cannot be rewritten online any more (%), and its legacy columns were left for the copy to carry: re-run this file',
        v_rel, v_why using errcode = 'object_not_in_prerequisite_state';
    end if;
    if v_stage = 'planned' and r.reason = pg_temp.p2_copy_for_backfills() and (v_why is not null or r.carries is not true) then
      -- (to be copied for its backfills alone, which the batches of updates above have done instead)
      delete from private.pending_rewrites as p where p.table_name = r.table_name;
      commit;
      continue;
    end if;
    if v_stage = 'planned' and v_why is not null then
      raise notice '%: rewritten by CLUSTER, under its lock: %', v_rel, v_why;
      if pg_temp.p2_rewrite_by_cluster(r.table_name, r.reason, r.removed_in) then
        delete from private.pending_rewrites as p where p.table_name = r.table_name;
      end if;
      commit;
      continue;
    end if;
    -- a copy that no longer matches its table (a re-run of the body changed the table) is made again
    if v_stage in ('copy', 'index', 'replay')
       and pg_temp.p2_rewrite_shape(v_rel) is distinct from pg_temp.p2_rewrite_shape(to_regclass(n.shadow)) then
      execute format('drop table if exists %s', n.shadow);
      execute format('truncate %s', n.log);
      v_stage := 'planned';
    end if;
    -- 1. the copy, its unique indexes, the log
    if v_stage = 'planned' then
      perform pg_temp.p2_rewrite_prepare(v_rel);
      v_stage := 'trigger';
      update private.pending_rewrites as p set step = v_stage where p.table_name = r.table_name;
      commit;
    end if;
    -- 2. the trigger that logs the app's writes (its lock is waited for at most lock_timeout at a time)
    if v_stage = 'trigger' then
      v_tries := 0;
      loop
        perform set_config('lock_timeout', v_timeout, true);
        exit when pg_temp.p2_rewrite_trigger(v_rel);
        v_tries := v_tries + 1;
        perform pg_temp.p2_lock_not_granted(v_rel, v_tries);
        commit;
        perform pg_catalog.pg_sleep(least(v_tries, 10) * 0.1);
      end loop;
      v_stage := 'copy';
      update private.pending_rewrites as p
         set step = v_stage, pages_done = 0, pages_total = pg_catalog.pg_relation_size(v_rel) / current_setting('block_size')::bigint
       where p.table_name = r.table_name;
      update private.pending_backfills as b set rows_done = 0, rows_total = (select greatest(x.reltuples, 0)::bigint from pg_catalog.pg_class x where x.oid = v_rel)
       where r.carries and to_regclass(b.table_name) = v_rel;
      commit;
    end if;
    -- 3. the rows copied in batches of pages, each its own transaction (a row the app changes meanwhile is
    -- logged, and replayed below)
    if v_stage = 'copy' then
      select p.pages_done, p.pages_total into v_page, v_pages from private.pending_rewrites as p where p.table_name = r.table_name;
      while v_page < v_pages loop
        call pg_temp.p2_yield_to_replicas();
        execute format('insert into %s (%s) overriding system value select %s from %s where ctid >= ''(%s,0)''::tid and ctid < ''(%s,0)''::tid
                        on conflict do nothing', n.shadow, pg_temp.p2_rewrite_columns(v_rel), pg_temp.p2_rewrite_columns(v_rel), v_rel,
                       v_page, v_page + v_step);
        get diagnostics v_count = row_count;
        update private.pending_rewrites as p set pages_done = v_page + v_step where p.table_name = r.table_name;
        if r.carries then
          update private.pending_backfills as b set rows_done = b.rows_done + v_count where to_regclass(b.table_name) = v_rel;
        end if;
        commit;
        v_page := v_page + v_step;
      end loop;
      v_stage := 'index';
      update private.pending_rewrites as p set step = v_stage where p.table_name = r.table_name;
      commit;
    end if;
    -- 4. the table's other indexes built on the copy (no one else uses it), one transaction each
    if v_stage = 'index' then
      for i in
        select x.indexrelid, pg_catalog.pg_get_indexdef(x.indexrelid) as def
          from pg_catalog.pg_index x
         where x.indrelid = v_rel and not x.indisunique and x.indisvalid order by 1
      loop
        execute format('create index if not exists %I on %s %s', 'p2r_' || i.indexrelid, n.shadow, substring(i.def from 'USING .*$'));
        commit;
      end loop;
      v_stage := 'replay';
      update private.pending_rewrites as p set step = v_stage where p.table_name = r.table_name;
      commit;
    end if;
    -- 5. the log replayed in batches until what is left fits one batch, then the swap in one short transaction
    if v_stage = 'replay' then
      loop
        call pg_temp.p2_yield_to_replicas();
        v_count := pg_temp.p2_rewrite_replay(v_rel, 10000);
        commit;
        exit when v_count < 10000;
      end loop;
      v_tries := 0;
      loop
        perform set_config('lock_timeout', v_timeout, true);
        v_validate := pg_temp.p2_rewrite_swap(v_rel);
        if v_validate is not null and r.carries then
          -- a carrying copy's backfills finished in the same transaction: its legacy columns dropped (nothing read)
          perform pg_temp.p2_finish_backfills(to_regclass(r.table_name));
        end if;
        exit when v_validate is not null;
        v_tries := v_tries + 1;
        perform pg_temp.p2_lock_not_granted(v_rel, v_tries);
        commit;
        perform pg_catalog.pg_sleep(least(v_tries, 10) * 0.1);
        perform pg_temp.p2_rewrite_replay(v_rel, 10000);
        commit;
      end loop;
      v_stage := 'validate';
      update private.pending_rewrites as p set step = v_stage, validate = v_validate where p.table_name = r.table_name
      returning p.pages_total, p.rows_replayed into v_pages, v_count;
      commit;
      raise notice '%: rewritten online: % pages copied, % written rows replayed, then swapped in (%)', r.table_name, v_pages, v_count, r.reason;
      -- the new table has no planner statistics yet (CLUSTER kept the old ones)
      execute format('analyze %s', r.table_name);
      commit;
    end if;
  end loop;
end
$$;

-- the constraints the online rewrites added back NOT VALID where they were valid (the table's own checks and
-- foreign keys, other tables' keys that point at it), validated one by one, each in a short transaction of
-- its own under SHARE UPDATE EXCLUSIVE (the app reads and writes meanwhile); then the rewrite is done
-- runbook: no-transaction
do $$
declare
  r record;
  v_item text;
begin
  for r in select p.table_name, p.validate from private.pending_rewrites as p where p.step = 'validate' order by 1 loop
    foreach v_item in array r.validate loop
      begin
        perform pg_temp.p2_outwait_autovacuum();
        execute format('alter table %s validate constraint %I', split_part(v_item, '|', 1), split_part(v_item, '|', 2));
      exception when check_violation or foreign_key_violation then
        raise warning '%: % no longer holds for every row: it stays NOT VALID', split_part(v_item, '|', 1), split_part(v_item, '|', 2);
      end;
      commit;
    end loop;
    delete from private.pending_rewrites as p where p.table_name = r.table_name;
    commit;
  end loop;
end
$$;

-- unique rules missing on tables that hold rows: built before the backfills (above), or again here where a
-- swap replaced one of their columns; then attached, one table per transaction, each lock waited for at most
-- lock_timeout (500 ms) and asked again: five tables locked in one transaction deadlocked with an app's
-- writes (psql, 1M variant shape)
-- runbook: no-transaction
create unique index concurrently if not exists organizations_slug_key on public.organizations (slug);
-- runbook: no-transaction
create unique index concurrently if not exists organization_members_organization_id_user_id_key
  on public.organization_members (organization_id, user_id);
-- runbook: no-transaction
create unique index concurrently if not exists products_organization_id_sku_key on public.products (organization_id, sku);
-- runbook: no-transaction
create unique index concurrently if not exists inventory_product_id_location_key on public.inventory (product_id, location);
-- runbook: no-transaction
create unique index concurrently if not exists api_keys_key_hash_key on public.api_keys (key_hash);
-- runbook: no-transaction
do $$
declare
  r record;
  v_timeout constant text := pg_temp.p2_lock_wait();
  v_tries integer;
begin
  for r in
    select x.tbl::regclass as tbl, x.name
      from (values ('public.organizations', 'organizations_slug_key'),
                   ('public.organization_members', 'organization_members_organization_id_user_id_key'),
                   ('public.products', 'products_organization_id_sku_key'),
                   ('public.inventory', 'inventory_product_id_location_key'),
                   ('public.api_keys', 'api_keys_key_hash_key')) as x (tbl, name)
     where not exists (select 1 from pg_catalog.pg_constraint c where c.conrelid = x.tbl::regclass and c.conname = x.name)
  loop
    v_tries := 0;
    loop
      begin
        perform set_config('lock_timeout', v_timeout, true);
        execute format('alter table %s add constraint %I unique using index %I', r.tbl, r.name, r.name);
        exit;
      exception when lock_not_available then
        v_tries := v_tries + 1;
        perform pg_temp.p2_lock_not_granted(r.tbl, v_tries);
      end;
      commit;
      perform pg_catalog.pg_sleep(least(v_tries, 10) * 0.1);
    end loop;
    commit;
  end loop;
end
$$;

-- indexes that cover the foreign keys and the queries of policies, retention, export and detection
-- runbook: no-transaction
create index concurrently if not exists profiles_organization_id_idx on public.profiles (organization_id);
-- runbook: no-transaction
create index concurrently if not exists organization_members_user_id_idx on public.organization_members (user_id);
-- runbook: no-transaction
create index concurrently if not exists inventory_organization_id_idx on public.inventory (organization_id);
-- runbook: no-transaction
create index concurrently if not exists api_keys_organization_id_idx on public.api_keys (organization_id);
-- runbook: no-transaction
create index concurrently if not exists api_keys_created_by_idx on public.api_keys (created_by);
-- runbook: no-transaction
create index concurrently if not exists audit_logs_organization_id_created_at_idx on public.audit_logs (organization_id, created_at desc);
-- runbook: no-transaction
create index concurrently if not exists audit_logs_user_id_created_at_idx on public.audit_logs (user_id, created_at desc);
-- runbook: no-transaction
create index concurrently if not exists audit_logs_record_id_idx on public.audit_logs (record_id);
-- runbook: no-transaction
create index concurrently if not exists audit_logs_created_at_idx on public.audit_logs (created_at);
-- runbook: no-transaction
create index concurrently if not exists security_events_organization_id_created_at_idx
  on public.security_events (organization_id, created_at desc);
-- runbook: no-transaction
create index concurrently if not exists security_events_user_id_created_at_idx on public.security_events (user_id, created_at desc);
-- runbook: no-transaction
create index concurrently if not exists security_events_ip_address_created_at_idx on public.security_events (ip_address, created_at desc);
-- runbook: no-transaction
create index concurrently if not exists security_events_created_at_idx on public.security_events (created_at);

-- the redaction done: its triggers dropped (ACCESS EXCLUSIVE on each table, one short transaction each),
-- then its functions, and the keys truncated (the file goes, not only the rows)
-- runbook: no-transaction
do $$
declare
  r record;
begin
  if exists (select 1 from private.pending_redactions as p where p.done_at is null) then
    raise exception 'copies of plaintext keys are still to redact in %: re-run this file',
      (select string_agg(p.table_name, ', ') from private.pending_redactions as p where p.done_at is null)
      using errcode = 'object_not_in_prerequisite_state';
  end if;
  for r in select t.tgrelid::regclass as rel, t.tgfoid::regprocedure as fn from pg_catalog.pg_trigger t
            where t.tgname = 'zz_p2_redact' and not t.tgisinternal order by 1 loop
    execute format('drop trigger zz_p2_redact on %s', r.rel);
    execute format('drop function %s', r.fn);
    commit;
  end loop;
  drop function if exists private.p2_secret_copies(text);
  drop function if exists private.p2_redact_jsonb(jsonb, text[]);
  drop function if exists private.p2_redact_text(text, text[]);
  truncate private.redaction_keys;
  delete from private.pending_redactions;
end
$$;

-- rules added NOT VALID above, validated now: each in a short transaction of its own under SHARE UPDATE
-- EXCLUSIVE, which lets the app read and write meanwhile (a re-run resumes with those still NOT VALID).
-- A rule that legacy rows break stays NOT VALID (reported by verify_data_integrity(); new writes are
-- checked). A NOT NULL check that holds makes its column NOT NULL without a scan, then goes.
-- runbook: no-transaction
do $$
declare
  r record;
  v_breaking bigint;
begin
  for r in
    select c.conrelid::regclass as tbl, c.conname, c.contype,
           case c.contype
             when 'c' then format('select count(*) from %s where not (%s)', c.conrelid::regclass, pg_catalog.pg_get_expr(c.conbin, c.conrelid))
             else format('select count(*) from %1$s as t where t.%2$I is not null and not exists (select 1 from %3$s as r where r.%4$I = t.%2$I)',
                         c.conrelid::regclass, a.attname, c.confrelid::regclass, ra.attname)
           end as breaking_sql
      from pg_catalog.pg_constraint c
      join pg_catalog.pg_attribute a on a.attrelid = c.conrelid and a.attnum = c.conkey[1]
      left join pg_catalog.pg_attribute ra on ra.attrelid = c.confrelid and ra.attnum = c.confkey[1]
     where c.contype in ('c', 'f') and not c.convalidated
       and c.conrelid in ('public.organizations'::regclass, 'public.profiles'::regclass, 'public.organization_members'::regclass,
                          'public.products'::regclass, 'public.inventory'::regclass, 'public.audit_logs'::regclass,
                          'public.api_keys'::regclass, 'public.security_events'::regclass)
     order by c.conrelid::regclass::text, c.conname
  loop
    begin
      perform pg_temp.p2_outwait_autovacuum();
      execute format('alter table %s validate constraint %I', r.tbl, r.conname);
    exception when check_violation or foreign_key_violation or not_null_violation then
      execute r.breaking_sql into v_breaking;
      raise notice '%: % legacy row(s) break %: kept, reported by verify_data_integrity(); every new write is checked',
        r.tbl, v_breaking, r.conname;
    end;
    commit;
  end loop;
  for r in
    select c.conrelid::regclass as tbl, c.conname, a.attname
      from pg_catalog.pg_constraint c
      join pg_catalog.pg_class t on t.oid = c.conrelid
      join pg_catalog.pg_attribute a on a.attrelid = c.conrelid and a.attnum = c.conkey[1]
     where c.contype = 'c' and c.convalidated and c.conname = format('%s_%s_not_null_check', t.relname, a.attname)
       and t.relnamespace = 'public'::regnamespace
       and t.relname in ('organizations', 'profiles', 'organization_members', 'products', 'inventory', 'audit_logs',
                         'api_keys', 'security_events')
     order by t.relname, c.conname
  loop
    execute format('alter table %s alter column %I set not null', r.tbl, r.attname);
    execute format('alter table %s drop constraint %I', r.tbl, r.conname);
    commit;
  end loop;
end
$$;

-- the primary keys on id attached to their unique indexes (a short transaction each; id is NOT NULL by now,
-- so no scan: a NULL id left in a legacy log stops here, naming the table); a legacy key on other columns
-- goes then, its columns unique by their own constraint
-- runbook: no-transaction
do $$
declare
  r record;
begin
  for r in
    select c.oid::regclass as tbl, c.relname || '_pkey' as name,
           (select k.conname from pg_catalog.pg_constraint k where k.conrelid = c.oid and k.contype = 'p') as legacy
      from pg_catalog.pg_class c
     where c.relnamespace = 'public'::regnamespace
       and c.relname in ('organizations', 'profiles', 'organization_members', 'products', 'inventory', 'audit_logs',
                         'api_keys', 'security_events')
       and not exists (select 1 from pg_catalog.pg_constraint k where k.conrelid = c.oid and k.contype = 'p' and k.conname = c.relname || '_pkey')
       and to_regclass(format('public.%I', c.relname || '_pkey')) is not null
     order by c.relname
  loop
    if r.legacy is not null then
      execute format('alter table %s drop constraint %I', r.tbl, r.legacy);
    end if;
    execute format('alter table %s add constraint %I primary key using index %I', r.tbl, r.name, r.name);
    raise notice '%: primary key % added on id', r.tbl, r.name;
    commit;
  end loop;
end
$$;

-- foreign keys after the commit: those to a table whose primary key was built above, added NOT VALID now;
-- and the contract's key that waits beside a legacy one of its name saying something else (another ON
-- DELETE): validated first (above), then in one short transaction the legacy key goes and the contract's
-- takes its name. A key added here is validated in a transaction of its own, as above.
-- runbook: no-transaction
do $$
declare
  f record;
  v_rel regclass;
  v_pending text;
  v_had boolean;
begin
  for f in select k.* from pg_temp.p2_foreign_keys() as k loop
    v_rel := to_regclass(format('public.%I', f.tbl));
    continue when v_rel is null;
    v_had := exists (select 1 from pg_catalog.pg_constraint c where c.conrelid = v_rel and c.conname = f.name);
    perform pg_temp.p2_ensure_fk(f.tbl, f.name, f.col, f.ref, f.refcol, f.on_delete);
    commit;
    v_pending := pg_temp.p2_fk_pending_name(f.name);
    if exists (select 1 from pg_catalog.pg_constraint c where c.conrelid = v_rel and c.conname = v_pending) then
      execute format('alter table %s drop constraint %I', v_rel, f.name);
      execute format('alter table %s rename constraint %I to %I', v_rel, v_pending, f.name);
      raise notice '%: foreign key % replaced by the contract''s (on delete %)', v_rel, f.name,
        case f.on_delete when 'c' then 'cascade' when 'n' then 'set null' else 'no action' end;
      commit;
    end if;
    if not v_had and exists (select 1 from pg_catalog.pg_constraint c where c.conrelid = v_rel and c.conname = f.name and not c.convalidated) then
      begin
        perform pg_temp.p2_outwait_autovacuum();
        execute format('alter table %s validate constraint %I', v_rel, f.name);
      exception when foreign_key_violation then
        raise notice '%: legacy row(s) break %: kept, reported by verify_data_integrity(); every new write is checked', v_rel, f.name;
      end;
      commit;
    end if;
  end loop;
end
$$;
