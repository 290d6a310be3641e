-- 001_core_schema.sql: consolidated core tables, legacy shapes converged without losing a row, RLS and policies, constraints, indexes
-- Deploys: tables public.organizations, profiles, organization_members, products, inventory, audit_logs,
--          api_keys, security_events (their constraints, indexes, updated_at triggers, RLS policies and
--          grants); private.member_org_ids(), private.admin_org_ids(), private.owner_org_ids(),
--          private.colleague_ids() (what the policies call, arrays of uuid: for the caller, auth.uid(),
--          never another user);
--          private.append_only() (the logs' trigger);
--          private.pending_rewrites (tables to rewrite once plaintext secrets are gone; empty at the end).
-- Requires: 000_core_functions.sql (checked below: the file stops at once without it).
--
-- Contents
--   1. Prerequisites, and the tables' locks taken first
--   2. Migration helpers (pg_temp: this session only)
--   3. The core tables, as created on an empty database
--   4. Legacy shapes converged: policies, columns, carried data, primary keys
--   5. Plaintext API keys: hashed, prefixed, redacted wherever copied, dropped
--   6. Rules: unique, foreign keys, NOT NULL and checks
--   7. Indexes adopted or dropped (missing ones are built at the end)
--   8. Policy helpers, append-only logs, updated_at triggers
--   9. Row-level security, policies and grants
--  10. Legacy triggers named, documentation in the catalog
--  11. After the commit (no transaction): rewrites, then indexes built concurrently
--
-- Notes
-- * Idempotent; no transaction control in here. The runbook engine runs the body in one transaction,
--   then each statement marked as no-transaction (all at the end: concurrent index builds on tables
--   that may hold production data, and the rewrite below) on its own; psql -f runs it statement by
--   statement.
-- * Legacy shapes are read from the catalog, not assumed. For each table the contract names, a spec
--   (pg_temp.p2_spec() below: column, type, default, NOT NULL, legacy synonyms) drives the convergence:
--   - a missing column takes a legacy synonym of the same type by rename (no rewrite), else it is added;
--   - legacy synonym columns still present are carried into it: values that convert fill empty cells,
--     values that do not convert (or that disagree with a value already there) are kept in a jsonb
--     column legacy_data under the legacy column's name; then the legacy column is dropped;
--   - a same-named column of another type is converted in place when every value converts losslessly
--     (varchar to text, numeric(10,2) to numeric(12,2): no rewrite), else carried as above;
--   - key columns (ids and references) of another type stop the phase: they are not guessed at;
--   - legacy columns the contract does not name stay, without NOT NULL if they have no default.
--   Every table's primary key is id: a legacy key on other columns stays as a unique constraint; a
--   legacy integer id that nothing references is kept as legacy_id and the table gets uuid ids (but
--   audit_logs keeps a legacy id of any type). Special cases by meaning: audit_logs.changes holding
--   {"old": ..., "new": ...} is split into old_data/new_data; api_keys' active/is_active/enabled/revoked
--   flags become revoked_at; inventory without organization_id takes its product's. The migration's
--   own writes run with the tables' user triggers off, so legacy updated_at values stay as they were.
-- * Plaintext API keys (api_keys.key, api_key, secret, token, ...): key_hash = sha256 hex of the key
--   (kept when newer code already wrote one), key_prefix = its first characters (at most 12, at most a
--   third of the key); every copy of a plaintext key in any text or jsonb column of any public table is
--   redacted; the column is dropped. The tables that held it are then rewritten (CLUSTER, at the end of
--   the file, once the transaction that removed the plaintext has committed: a rewrite inside it would
--   copy the old row versions) so that no dead row version keeps it; private.pending_rewrites holds the
--   list in between, so an interrupted run finishes the job when re-run. A transaction that was open
--   before the rewrite keeps old row versions alive (CLUSTER must copy what it may still see): run it in
--   the maintenance window (the rewrite waits up to a minute for older transactions of this database to end,
--   then warns and leaves the job for a re-run; verify_data_integrity() reports it as an error meanwhile).
--   WAL, replicas and earlier backups still hold the plaintext: rotate those keys.
-- * Rules: constraints are named after the rule they enforce. On rows already there they are added
--   NOT VALID and validated only when no row breaks them: legacy rows that break a rule are kept
--   unchanged and reported by verify_data_integrity() and the preflight, while every new write is
--   checked. An UPDATE that leaves such a row still breaking its rule is refused, naming the rule:
--   fix the row in the same statement. Legacy CHECK constraints on these tables are replaced by the
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
-- 1. Prerequisites, and the tables' locks taken first
-- ====================================================================================================

-- prerequisites: phase 1
do $$
begin
  if to_regprocedure('public.update_updated_at_column()') is null
     or to_regprocedure('public.is_org_member(uuid, uuid)') is null
     or to_regprocedure('public.validate_sku(text)') is null
     or to_regprocedure('public.validate_org_slug(text)') is null
     or to_regnamespace('private') is null then
    raise exception '001_core_schema.sql requires 000_core_functions.sql: apply it first'
      using errcode = 'object_not_in_prerequisite_state';
  end if;
end
$$;

-- the locks of the tables this phase converges, taken first and in one fixed order (parents before
-- children): the phase then never waits for a lock halfway through its work, so it cannot deadlock with
-- the app's transactions there; the wait here is bounded by the runner's lock_timeout (retried whole).
-- Under psql -f each statement commits on its own, and this one changes nothing.
do $$
declare
  v_table text;
begin
  foreach v_table in array array['organizations', 'profiles', 'organization_members', 'products', 'inventory',
                                 'audit_logs', 'api_keys', 'security_events'] loop
    if to_regclass(format('public.%I', v_table)) is not null then
      execute format('lock table public.%I in access exclusive mode', v_table);
    end if;
  end loop;
end
$$;

-- ====================================================================================================
-- 2. Migration helpers (pg_temp: this session only)
-- ====================================================================================================

-- migration helpers for this file only (in pg_temp: they vanish with the session)
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
create or replace function pg_temp.p2_column_type(p_rel regclass, p_col text) returns text
language sql stable
as $fn$
  select pg_catalog.format_type(a.atttypid, a.atttypmod)
    from pg_catalog.pg_attribute a
   where a.attrelid = p_rel and a.attname = p_col and a.attnum > 0 and not a.attisdropped
$fn$;

-- the migration's own writes are not business writes: user triggers (updated_at, audit) stay quiet
create or replace function pg_temp.p2_triggers_off(p_rel regclass) returns text[]
language plpgsql
as $fn$
declare
  v_names text[];
  v_name text;
begin
  select coalesce(array_agg(t.tgname::text order by t.tgname), '{}') into v_names
    from pg_catalog.pg_trigger t
   where t.tgrelid = p_rel and not t.tgisinternal and t.tgenabled = 'O';
  foreach v_name in array v_names loop
    execute format('alter table %s disable trigger %I', p_rel, v_name);
  end loop;
  return v_names;
end
$fn$;

-- and back on, exactly those that were on
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

-- keep the values of a legacy column that match p_where in legacy_data, under p_key
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
  raise notice '%: % value(s) of legacy column % kept in legacy_data', p_rel, v_count, p_key;
end
$fn$;

-- carry legacy column p_source into p_target, keep what does not convert, drop p_source
create or replace function pg_temp.p2_carry(p_rel regclass, p_target text, p_source text, p_stash_key text) returns void
language plpgsql
as $fn$
declare
  v_from constant text := pg_temp.p2_column_type(p_rel, p_source);
  v_to constant text := pg_temp.p2_column_type(p_rel, p_target);
  v_conv text;
  v_row_conv text;
  v_count bigint;
  v_tried bigint;
begin
  v_conv := pg_temp.p2_conversion(v_from, v_to, quote_ident(p_source));
  v_row_conv := pg_temp.p2_conversion(v_from, v_to, format('($1)::%s', v_from));
  perform pg_temp.p2_stash(p_rel, p_stash_key, p_source,
    format('%1$I is not null and %2$I is not null and %2$I::text is distinct from %1$I::text', p_source, p_target));
  begin
    execute format('update %s set %I = %s where %I is null and %I is not null', p_rel, p_target, v_conv, p_target, p_source);
    get diagnostics v_count = row_count;
  exception when others then
    -- some values do not convert. Where the server tells valid input without trying it (16+), the
    -- valid ones are converted in one set-based pass; the rest are tried value by value (NULL where it
    -- fails: a subtransaction each, linear in the rows); what stays NULL is kept in legacy_data below
    v_count := 0;
    if to_regproc('pg_catalog.pg_input_is_valid') is not null then
      begin
        execute format('update %s set %I = %s where %I is null and %I is not null and pg_input_is_valid(%I::text, %L)',
                       p_rel, p_target, v_conv, p_target, p_source, p_source, v_to);
        get diagnostics v_count = row_count;
      exception when others then
        v_count := 0;
      end;
    end if;
    drop function if exists pg_temp.p2_convert_or_null(text);
    execute format('create function pg_temp.p2_convert_or_null(text) returns %s language plpgsql immutable
                    as $conv$ begin return %s; exception when others then return null; end $conv$', v_to, v_row_conv);
    execute format('update %1$s as t set %2$I = f.v
                      from (select ctid as tid, pg_temp.p2_convert_or_null(%3$I::text) as v
                              from %1$s where %2$I is null and %3$I is not null) as f
                     where f.v is not null and t.ctid = f.tid', p_rel, p_target, p_source);
    get diagnostics v_tried = row_count;
    v_count := v_count + v_tried;
  end;
  perform pg_temp.p2_stash(p_rel, p_stash_key, p_source, format('%I is null and %I is not null', p_target, p_source));
  raise notice '%: legacy column % (%) carried into % (%) for % row(s), then dropped', p_rel, p_source, v_from, p_target, v_to, v_count;
  execute format('alter table %s drop column %I', p_rel, p_source);
end
$fn$;

-- convert a column in place when every value converts losslessly; false when it cannot
create or replace function pg_temp.p2_try_alter_type(p_rel regclass, p_col text, p_from text, p_to text) returns boolean
language plpgsql
as $fn$
declare
  v_conv constant text := pg_temp.p2_conversion(p_from, p_to, quote_ident(p_col));
  v_lossy boolean;
begin
  execute format('select exists (select 1 from %s where %I is not null and (%s) is null)', p_rel, p_col, v_conv) into v_lossy;
  if v_lossy then
    return false;
  end if;
  execute format('alter table %s alter column %I drop default', p_rel, p_col);
  begin
    execute format('alter table %s alter column %I type %s', p_rel, p_col, p_to);
  exception when others then
    execute format('alter table %s alter column %I type %s using %s', p_rel, p_col, p_to, v_conv);
  end;
  raise notice '%: column % converted from % to %', p_rel, p_col, p_from, p_to;
  return true;
exception when others then
  return false;
end
$fn$;

-- converge one table to the spec; returns the columns it added
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
        -- a numeric id that nothing references: kept as legacy_id, the table gets uuid ids
        v_legacy := 'legacy_id';
        while pg_temp.p2_column_type(v_rel, v_legacy) is not null loop
          v_legacy := v_legacy || '_';
        end loop;
        execute format('alter table %s rename column id to %I', v_rel, v_legacy);
        execute format('alter table %s alter column %I drop default', v_rel, v_legacy);
        for v_syn in select c.conname from pg_catalog.pg_constraint as c where c.conrelid = v_rel and c.contype = 'p' loop
          execute format('alter table %s drop constraint %I', v_rel, v_syn);
        end loop;
        execute format('alter table %s add column id uuid default gen_random_uuid()', v_rel);
        raise notice '%: legacy % id kept as %; the table now has uuid ids', v_rel, v_type, v_legacy;
      elsif s.is_key then
        raise exception '%.% is % but the contract needs %: key columns are not converted automatically', v_rel, s.col, v_type, s.typ
          using errcode = 'datatype_mismatch',
                hint = 'Convert the column and the columns that reference it by hand, then re-run this file.';
      elsif not pg_temp.p2_try_alter_type(v_rel, s.col, v_type, s.typ) then
        v_legacy := s.col || '_legacy';
        while pg_temp.p2_column_type(v_rel, v_legacy) is not null loop
          v_legacy := v_legacy || '_';
        end loop;
        execute format('alter table %s rename column %I to %I', v_rel, s.col, v_legacy);
        execute format('alter table %s add column %I %s', v_rel, s.col, s.typ);
        perform pg_temp.p2_carry(v_rel, s.col, v_legacy, s.col);
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
        if cardinality(v_present) = 0 and s.dflt is not null then
          -- nothing to carry: existing rows take the default (a fast default where it is not volatile)
          execute format('alter table %s add column %I %s default %s', v_rel, s.col, v_type, s.dflt);
        else
          -- legacy values are carried below; a row without one stays NULL (and is reported) rather than invent one
          execute format('alter table %s add column %I %s', v_rel, s.col, v_type);
        end if;
        v_added := v_added || s.col;
        raise notice '%: column % % added', v_rel, s.col, v_type;
      end if;
    end if;
    -- legacy synonyms still present: carried into the column, then dropped
    foreach v_syn in array s.synonyms loop
      if pg_temp.p2_column_type(v_rel, v_syn) is not null then
        perform pg_temp.p2_carry(v_rel, s.col, v_syn, v_syn);
      end if;
    end loop;
    -- the contract's default (a column of free type keeps its own unless added here)
    if s.dflt is not null and (s.typ <> 'any' or s.col = any (v_added)) then
      execute format('alter table %s alter column %I set default %s', v_rel, s.col, s.dflt);
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
create or replace function pg_temp.p2_column_names(p_rel regclass, p_attnums smallint[]) returns text[]
language sql stable
as $fn$
  select array(select a.attname::text
                 from unnest(p_attnums) with ordinality as k (attnum, n)
                 join pg_catalog.pg_attribute a on a.attrelid = p_rel and a.attnum = k.attnum
                order by k.n)
$fn$;

-- the primary key is on id, named <table>_pkey (a legacy key on other columns stays as a unique constraint)
create or replace function pg_temp.p2_ensure_pk(p_table text) returns void
language plpgsql
as $fn$
declare
  v_rel constant regclass := format('public.%I', p_table)::regclass;
  v_name constant text := p_table || '_pkey';
  v_current text;
  v_columns text[];
  v_unique text;
  v_bad bigint;
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
  execute format('select count(*) from (select id from %s group by id having count(*) > 1 or id is null) as d', v_rel) into v_bad;
  if v_bad > 0 then
    raise exception '%: cannot make id the primary key: % id value(s) are NULL or duplicated', v_rel, v_bad
      using errcode = 'unique_violation', hint = 'Give those rows distinct ids, then re-run this file.';
  end if;
  if v_current is not null then
    -- a primary key on other columns: they keep their uniqueness as a constraint, id becomes the key
    v_unique := left(format('%s_%s_key', p_table, array_to_string(v_columns, '_')), 63);
    if not exists (select 1 from pg_catalog.pg_constraint c where c.conrelid = v_rel and c.conname = v_unique) then
      execute format('alter table %s add constraint %I unique (%s)', v_rel, v_unique,
                     (select string_agg(quote_ident(x), ', ') from unnest(v_columns) as x));
    end if;
    execute format('alter table %s drop constraint %I', v_rel, v_current);
    raise notice '%: primary key % on (%) replaced: (%) stay unique as %', v_rel, v_current,
      array_to_string(v_columns, ', '), array_to_string(v_columns, ', '), v_unique;
  end if;
  execute format('alter table %s add constraint %I primary key (id)', v_rel, v_name);
  raise notice '%: primary key % added on id', v_rel, v_name;
end
$fn$;

-- a unique rule: adopt an equivalent constraint or index, else check the rows (built at the end)
create or replace function pg_temp.p2_ensure_unique(p_table text, p_name text, p_cols text[]) returns void
language plpgsql
as $fn$
declare
  v_rel constant regclass := format('public.%I', p_table)::regclass;
  r record;
  v_sample text;
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
  execute format('select string_agg(k, ''; '') from (select concat_ws('', '', %s) as k from %s where %s group by %s having count(*) > 1 limit 5) as d',
                 (select string_agg(quote_ident(c), ', ') from unnest(p_cols) as c), v_rel,
                 (select string_agg(format('%I is not null', c), ' and ') from unnest(p_cols) as c),
                 (select string_agg(quote_ident(c), ', ') from unnest(p_cols) as c))
    into v_sample;
  if v_sample is not null then
    raise exception '%: cannot enforce % (unique %): duplicated values such as %', v_rel, p_name, array_to_string(p_cols, ', '), v_sample
      using errcode = 'unique_violation',
            hint = 'Resolve the duplicates (the preflight lists them), then re-run this file. Nothing was changed.';
  end if;
  raise notice '%: % (unique %) is built concurrently at the end of this file', v_rel, p_name, array_to_string(p_cols, ', ');
end
$fn$;

-- a foreign key: adopt an equivalent one, replace a different one on the column, validate when clean
create or replace function pg_temp.p2_ensure_fk(p_table text, p_name text, p_col text, p_ref regclass, p_refcol text, p_on_delete "char")
returns void
language plpgsql
as $fn$
declare
  v_rel constant regclass := format('public.%I', p_table)::regclass;
  v_att smallint;
  v_refatt smallint;
  v_done boolean := false;
  v_orphans bigint;
  r record;
begin
  select a.attnum into v_att from pg_catalog.pg_attribute a where a.attrelid = v_rel and a.attname = p_col and not a.attisdropped;
  select a.attnum into v_refatt from pg_catalog.pg_attribute a where a.attrelid = p_ref and a.attname = p_refcol and not a.attisdropped;
  for r in
    select c.conname, c.convalidated,
           (c.confrelid = p_ref and c.conkey = array[v_att] and c.confkey = array[v_refatt]
            and c.confdeltype = p_on_delete and c.confupdtype = 'a' and c.confmatchtype = 's' and not c.condeferrable) as same
      from pg_catalog.pg_constraint c
     where c.conrelid = v_rel and c.contype = 'f' and (c.conname = p_name or c.conkey = array[v_att])
     order by c.conname = p_name desc, c.conname
  loop
    if r.same and not v_done then
      if r.conname <> p_name then
        execute format('alter table %s rename constraint %I to %I', v_rel, r.conname, p_name);
        raise notice '%: foreign key % renamed to %', v_rel, r.conname, p_name;
      end if;
      v_done := true;
    else
      execute format('alter table %s drop constraint %I', v_rel, r.conname);
      raise notice '%: foreign key % dropped: the contract''s % references %(%) on delete %', v_rel, r.conname, p_name, p_ref, p_refcol,
        case p_on_delete when 'c' then 'cascade' when 'n' then 'set null' else 'no action' end;
    end if;
  end loop;
  if not v_done then
    execute format('alter table %s add constraint %I foreign key (%I) references %s (%I) on delete %s not valid',
                   v_rel, p_name, p_col, p_ref, p_refcol,
                   case p_on_delete when 'c' then 'cascade' when 'n' then 'set null' else 'no action' end);
  end if;
  if not (select c.convalidated from pg_catalog.pg_constraint c where c.conrelid = v_rel and c.conname = p_name) then
    execute format('select count(*) from %1$s as t where t.%2$I is not null and not exists (select 1 from %3$s as r where r.%4$I = t.%2$I)',
                   v_rel, p_col, p_ref, p_refcol) into v_orphans;
    if v_orphans = 0 then
      execute format('alter table %s validate constraint %I', v_rel, p_name);
    else
      raise notice '%: % legacy row(s) break % (their % is missing): kept, reported by verify_data_integrity(); every new write is checked',
        v_rel, v_orphans, p_name, p_col;
    end if;
  end if;
end
$fn$;

-- a check rule: replace a same-named one that says something else, add NOT VALID, validate when clean
create or replace function pg_temp.p2_ensure_check(p_table text, p_name text, p_expr text) returns void
language plpgsql
as $fn$
declare
  v_rel constant regclass := format('public.%I', p_table)::regclass;
  v_have text;
  v_want text;
  v_valid boolean;
  v_breaking bigint;
begin
  select pg_catalog.pg_get_constraintdef(c.oid), c.convalidated into v_have, v_valid
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
  if v_have is null then
    execute format('alter table %s add constraint %I check (%s) not valid', v_rel, p_name, p_expr);
    v_valid := false;
  end if;
  if not v_valid then
    execute format('select count(*) from %s where not (%s)', v_rel, p_expr) into v_breaking;
    if v_breaking = 0 then
      execute format('alter table %s validate constraint %I', v_rel, p_name);
    else
      raise notice '%: % legacy row(s) break %: kept, reported by verify_data_integrity(); every new write is checked',
        v_rel, v_breaking, p_name;
    end if;
  end if;
end
$fn$;

-- NOT NULL where no row is null, else a NOT VALID check <table>_<column>_not_null_check
create or replace function pg_temp.p2_ensure_not_null(p_table text, p_col text) returns text
language plpgsql
as $fn$
declare
  v_rel constant regclass := format('public.%I', p_table)::regclass;
  v_check constant text := format('%s_%s_not_null_check', p_table, p_col);
  v_nulls boolean;
begin
  if not (select a.attnotnull from pg_catalog.pg_attribute a where a.attrelid = v_rel and a.attname = p_col) then
    execute format('select exists (select 1 from %s where %I is null)', v_rel, p_col) into v_nulls;
    if v_nulls then
      perform pg_temp.p2_ensure_check(p_table, v_check, format('%I is not null', p_col));
      return v_check;
    end if;
    execute format('alter table %s alter column %I set not null', v_rel, p_col);
  end if;
  if exists (select 1 from pg_catalog.pg_constraint c where c.conrelid = v_rel and c.conname = v_check) then
    execute format('alter table %s drop constraint %I', v_rel, v_check);
  end if;
  return null;
end
$fn$;

-- redaction of plaintext secrets wherever they were copied
create or replace function pg_temp.p2_redact_text(p_text text, p_secrets text[]) returns text
language plpgsql immutable
as $fn$
declare
  v_secret text;
begin
  foreach v_secret in array p_secrets loop
    p_text := replace(p_text, v_secret, format('[redacted api key %s...]', left(v_secret, least(12, length(v_secret) / 3))));
  end loop;
  return p_text;
end
$fn$;

-- the same through a json document, keys and values
create or replace function pg_temp.p2_redact_jsonb(p_doc jsonb, p_secrets text[]) returns jsonb
language sql immutable
as $fn$
  select case jsonb_typeof(p_doc)
    when 'object' then coalesce((select jsonb_object_agg(pg_temp.p2_redact_text(e.key, p_secrets), pg_temp.p2_redact_jsonb(e.value, p_secrets))
                                   from jsonb_each(p_doc) as e), '{}'::jsonb)
    when 'array' then coalesce((select jsonb_agg(pg_temp.p2_redact_jsonb(e.value, p_secrets) order by e.n)
                                  from jsonb_array_elements(p_doc) with ordinality as e (value, n)), '[]'::jsonb)
    when 'string' then to_jsonb(pg_temp.p2_redact_text(p_doc #>> '{}', p_secrets))
    else p_doc
  end
$fn$;

-- the plaintext keys being redacted, indexed, with what finding their copies needs: the characters
-- they are made of (as a regular-expression class) and their lengths
create or replace function pg_temp.p2_load_secrets(p_secrets text[]) returns void
language plpgsql
as $fn$
begin
  create temporary table if not exists p2_secrets (secret text primary key) on commit drop;
  truncate pg_temp.p2_secrets;
  insert into pg_temp.p2_secrets select distinct s from unnest(p_secrets) as s where s <> '';
  analyze pg_temp.p2_secrets;
end
$fn$;

-- a query of (tid, secrets): the rows of p_rel whose text p_text (an expression over t) holds a copy of a
-- plaintext key, with the keys it holds. Linear in the data, not rows x keys: every copy of a key lies inside a maximal run
-- of the characters keys are made of, so each value is cut into such runs (one regular-expression pass),
-- each run into its substrings of the keys' lengths, and those are looked up in the key set's index.
-- Values without the prefix all keys share (often a scheme like sk_live_) are skipped by strpos first.
create or replace function pg_temp.p2_find_secret_copies(p_rel regclass, p_text text) returns text
language plpgsql stable
as $fn$
declare
  v_class text;
  v_lengths int[];
  v_prefix text;
begin
  -- what every key starts with: a fast substring search (strpos) skips values that cannot hold one
  select left((select min(x.secret) from pg_temp.p2_secrets as x), coalesce(max(n), 0))
    into v_prefix
    from generate_series(1, (select min(length(x.secret)) from pg_temp.p2_secrets as x)) as n
   where (select count(distinct left(x.secret, n)) from pg_temp.p2_secrets as x) = 1;
  select string_agg(distinct case when c ~ '^[A-Za-z0-9]$' then c
                                  when ascii(c) > 65535 then '\U' || lpad(to_hex(ascii(c)), 8, '0')
                                  else '\u' || lpad(to_hex(ascii(c)), 4, '0') end, ''),
         array_agg(distinct length(s.secret))
    into v_class, v_lengths
    from pg_temp.p2_secrets as s, regexp_split_to_table(s.secret, '') as c;
  return format(
    'select t.ctid as tid, array_agg(distinct k.secret order by k.secret) as secrets
       from %1$s as t
      cross join lateral regexp_matches(%2$s, %3$L, ''g'') as m (run)
      cross join lateral unnest(%4$L::int[]) as l (len)
      cross join lateral generate_series(1, length(m.run[1]) - l.len + 1) as p (pos)
       join pg_temp.p2_secrets as k on k.secret = substr(m.run[1], p.pos, l.len)
      where strpos(%2$s, %5$L) > 0
      group by t.ctid',
    p_rel, p_text, format('[%s]{%s,}', v_class, least((select min(x) from unnest(v_lengths) as x), 255)), v_lengths,
    v_prefix);
end
$fn$;

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

-- converge every core table that exists in another shape: columns, carried data, legacy columns
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
      update public.inventory as i set organization_id = p.organization_id
        from public.products as p
       where p.id = i.product_id and i.organization_id is null;
    end if;
    perform pg_temp.p2_triggers_on(format('public.%I', v_table)::regclass, v_quiet);
  end loop;
  perform set_config('TimeZone', v_timezone, true);
end
$$;

-- audit_logs.changes: {"old": ..., "new": ...} is split into old_data/new_data, anything else is new_data
do $$
declare
  v_quiet text[];
  v_fits constant text := 'jsonb_typeof(changes) = ''object'' and changes <> ''{}''::jsonb and (changes - ''old'' - ''new'') = ''{}''::jsonb';
begin
  if pg_temp.p2_column_type('public.audit_logs', 'changes') is null then
    return;
  end if;
  v_quiet := pg_temp.p2_triggers_off('public.audit_logs');
  if pg_temp.p2_column_type('public.audit_logs', 'changes') <> 'jsonb' then
    perform pg_temp.p2_carry('public.audit_logs', 'new_data', 'changes', 'changes');
    perform pg_temp.p2_triggers_on('public.audit_logs', v_quiet);
    return;
  end if;
  perform pg_temp.p2_stash('public.audit_logs', 'changes', 'changes', format(
    'changes is not null and not (case when %1$s then (old_data is null or old_data = nullif(changes -> ''old'', ''null''::jsonb))
                                                 and (new_data is null or new_data = nullif(changes -> ''new'', ''null''::jsonb))
                                  else (new_data is null or new_data = changes) end)', v_fits));
  execute format('update public.audit_logs
                     set old_data = coalesce(old_data, nullif(changes -> ''old'', ''null''::jsonb)),
                         new_data = coalesce(new_data, nullif(changes -> ''new'', ''null''::jsonb))
                   where changes is not null and %s', v_fits);
  execute format('update public.audit_logs set new_data = changes
                   where changes is not null and new_data is null and not (%s)', v_fits);
  raise notice 'public.audit_logs: legacy column changes carried into old_data/new_data, then dropped';
  alter table public.audit_logs drop column changes;
  perform pg_temp.p2_triggers_on('public.audit_logs', v_quiet);
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

-- tables to rewrite once this transaction has committed (the end of this file empties it)
create table if not exists private.pending_rewrites (
  table_name text not null,
  reason text not null,
  removed_in xid not null default pg_current_xact_id()::xid,
  requested_at timestamptz not null default now(),
  constraint pending_rewrites_pkey primary key (table_name)
);
revoke all on table private.pending_rewrites from public, anon, authenticated, service_role;
comment on table private.pending_rewrites is
  'Tables that 001_core_schema.sql rewrites (CLUSTER) at its end, after the transaction that removed plaintext secrets from them has committed.';

-- plaintext api keys: hashed, prefixed, redacted everywhere, dropped; the tables are rewritten at the end
do $$
declare
  v_col text;
  v_secrets text[];
  v_mismatched bigint;
  v_changed regclass[] := '{}';
  r record;
  v_count bigint;
  v_quiet text[];
begin
  for v_col in
    select a.attname from pg_catalog.pg_attribute a
     where a.attrelid = 'public.api_keys'::regclass and a.attnum > 0 and not a.attisdropped
       and a.atttypid in ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype)
       and a.attname in ('key', 'api_key', 'secret', 'secret_key', 'token', 'plaintext_key', 'plain_key', 'raw_key', 'key_value')
     order by a.attnum
  loop
    execute format('select coalesce(array_agg(distinct %1$I), ''{}'') from public.api_keys where %1$I is not null and %1$I <> ''''', v_col)
      into v_secrets;
    v_quiet := pg_temp.p2_triggers_off('public.api_keys');
    execute format('update public.api_keys set key_hash = encode(sha256(convert_to(%1$I, ''UTF8'')), ''hex'')
                     where key_hash is null and %1$I is not null', v_col);
    execute format('select count(*) from public.api_keys
                     where %1$I is not null and key_hash <> encode(sha256(convert_to(%1$I, ''UTF8'')), ''hex'')', v_col)
      into v_mismatched;
    if v_mismatched > 0 then
      raise warning 'public.api_keys: % key(s) already had a key_hash that is not the sha256 of their plaintext: the stored key_hash is kept', v_mismatched;
    end if;
    execute format('update public.api_keys set key_prefix = left(%1$I, least(12, length(%1$I) / 3))
                     where key_prefix is null and %1$I is not null', v_col);
    perform pg_temp.p2_triggers_on('public.api_keys', v_quiet);
    -- copies of the plaintext in any text or jsonb column of any public table, found in time linear in
    -- the data whatever the number of keys (pg_temp.p2_find_secret_copies), one pass per table
    if cardinality(v_secrets) > 0 then
      perform pg_temp.p2_load_secrets(v_secrets);
      for r in
        select c.oid::regclass as rel,
               string_agg(format('t.%I::text', a.attname), ', ' order by a.attname) as texts,
               string_agg(format('%1$I = case when %2$s then %3$s else t.%1$I end', a.attname,
                                 format('exists (select 1 from unnest(f.secrets) as s where strpos(t.%I::text, s) > 0)', a.attname),
                                 case a.atttypid
                                   when 'jsonb'::regtype then format('pg_temp.p2_redact_jsonb(t.%I, f.secrets)', a.attname)
                                   when 'json'::regtype then format('pg_temp.p2_redact_jsonb(t.%I::jsonb, f.secrets)::json', a.attname)
                                   else format('pg_temp.p2_redact_text(t.%I, f.secrets)', a.attname)
                                 end), ', ' order by a.attname) as redactions
          from pg_catalog.pg_class c
          join pg_catalog.pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
         where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
           and a.atttypid in ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype, 'json'::regtype, 'jsonb'::regtype)
           and not (c.oid = 'public.api_keys'::regclass and a.attname = v_col)
         group by c.oid
         order by c.oid::regclass::text
      loop
        v_quiet := pg_temp.p2_triggers_off(r.rel);
        -- a column is rewritten only where it holds a key (a json column keeps its text as it is)
        execute format('update %1$s as t set %2$s from (%3$s) as f where t.ctid = f.tid', r.rel, r.redactions,
                       pg_temp.p2_find_secret_copies(r.rel, format('concat_ws(chr(1), %s)', r.texts)));
        get diagnostics v_count = row_count;
        perform pg_temp.p2_triggers_on(r.rel, v_quiet);
        if v_count > 0 then
          raise notice '%: plaintext api key(s) redacted in % row(s)', r.rel, v_count;
          v_changed := v_changed || r.rel;
        end if;
      end loop;
    end if;
    execute format('alter table public.api_keys drop column %I', v_col);
    v_changed := v_changed || 'public.api_keys'::regclass;
    raise warning 'public.api_keys: % plaintext key(s) in column % replaced by key_prefix and a sha256 key_hash; the column is dropped. Treat those keys as exposed and rotate them: WAL, replicas and earlier backups still hold them.',
      cardinality(v_secrets), v_col;
  end loop;
  -- the rewrite happens at the end of this file, after this transaction has committed
  insert into private.pending_rewrites (table_name, reason)
  select distinct x::text, 'old row versions hold plaintext api keys' from unnest(v_changed) as x
  on conflict (table_name) do nothing;
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

-- foreign keys (the logs have none: they outlive what they name)
do $$
begin
  perform pg_temp.p2_ensure_fk('profiles', 'profiles_id_fkey', 'id', 'auth.users', 'id', 'c');
  perform pg_temp.p2_ensure_fk('profiles', 'profiles_organization_id_fkey', 'organization_id', 'public.organizations', 'id', 'n');
  perform pg_temp.p2_ensure_fk('organization_members', 'organization_members_organization_id_fkey', 'organization_id', 'public.organizations', 'id', 'c');
  perform pg_temp.p2_ensure_fk('organization_members', 'organization_members_user_id_fkey', 'user_id', 'auth.users', 'id', 'c');
  perform pg_temp.p2_ensure_fk('products', 'products_organization_id_fkey', 'organization_id', 'public.organizations', 'id', 'c');
  perform pg_temp.p2_ensure_fk('inventory', 'inventory_organization_id_fkey', 'organization_id', 'public.organizations', 'id', 'c');
  perform pg_temp.p2_ensure_fk('inventory', 'inventory_product_id_fkey', 'product_id', 'public.products', 'id', 'c');
  perform pg_temp.p2_ensure_fk('api_keys', 'api_keys_organization_id_fkey', 'organization_id', 'public.organizations', 'id', 'c');
  perform pg_temp.p2_ensure_fk('api_keys', 'api_keys_created_by_fkey', 'created_by', 'auth.users', 'id', 'n');
end
$$;

-- rules: NOT NULL and checks named after what they enforce; legacy checks on these tables are replaced
do $$
declare
  v_ours text[] := array[
    'organizations_slug_format_check', 'organizations_name_not_blank_check',
    'organization_members_role_check',
    'products_sku_format_check', 'products_name_not_blank_check', 'products_price_nonnegative_check',
    'products_currency_format_check',
    'inventory_quantity_nonnegative_check', 'inventory_reserved_within_quantity_check', 'inventory_location_not_blank_check',
    'audit_logs_action_not_blank_check',
    'api_keys_name_not_blank_check', 'api_keys_key_hash_format_check', 'api_keys_key_prefix_length_check',
    'security_events_severity_check', 'security_events_event_type_not_blank_check'];
  s record;
  v_check text;
  r record;
begin
  for s in select sp.tbl, sp.col from pg_temp.p2_spec() as sp where sp.not_null order by sp.ord loop
    v_check := pg_temp.p2_ensure_not_null(s.tbl, s.col);
    if v_check is not null then
      v_ours := v_ours || v_check;
    end if;
  end loop;
  perform pg_temp.p2_ensure_check('organizations', 'organizations_slug_format_check', 'public.validate_org_slug(slug)');
  perform pg_temp.p2_ensure_check('organizations', 'organizations_name_not_blank_check', 'btrim(name) <> ''''');
  perform pg_temp.p2_ensure_check('organization_members', 'organization_members_role_check', 'role in (''owner'', ''admin'', ''member'', ''viewer'')');
  perform pg_temp.p2_ensure_check('products', 'products_sku_format_check', 'public.validate_sku(sku)');
  perform pg_temp.p2_ensure_check('products', 'products_name_not_blank_check', 'btrim(name) <> ''''');
  perform pg_temp.p2_ensure_check('products', 'products_price_nonnegative_check', 'price >= 0');
  perform pg_temp.p2_ensure_check('products', 'products_currency_format_check', 'currency ~ ''^[A-Z]{3}$''');
  perform pg_temp.p2_ensure_check('inventory', 'inventory_quantity_nonnegative_check', 'quantity >= 0');
  perform pg_temp.p2_ensure_check('inventory', 'inventory_reserved_within_quantity_check', 'reserved_quantity >= 0 and reserved_quantity <= quantity');
  perform pg_temp.p2_ensure_check('inventory', 'inventory_location_not_blank_check', 'btrim(location) <> ''''');
  perform pg_temp.p2_ensure_check('audit_logs', 'audit_logs_action_not_blank_check', 'btrim(action) <> ''''');
  perform pg_temp.p2_ensure_check('api_keys', 'api_keys_name_not_blank_check', 'btrim(name) <> ''''');
  perform pg_temp.p2_ensure_check('api_keys', 'api_keys_key_hash_format_check', 'key_hash ~ ''^[0-9a-f]{64}$''');
  perform pg_temp.p2_ensure_check('api_keys', 'api_keys_key_prefix_length_check', 'length(key_prefix) between 4 and 16');
  perform pg_temp.p2_ensure_check('security_events', 'security_events_severity_check', 'severity in (''low'', ''medium'', ''high'', ''critical'')');
  perform pg_temp.p2_ensure_check('security_events', 'security_events_event_type_not_blank_check', 'btrim(event_type) <> ''''');
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

-- the helpers of earlier releases took a user argument and answered for anyone: dropped now that the
-- policies above call the caller-only ones. Never CASCADE: an object of someone else's that still calls
-- one stops the phase, named, so that it is re-pointed rather than silently dropped.
do $$
declare
  r record;
  v_users text;
begin
  for r in
    select p.oid, p.oid::regprocedure::text as fn from pg_catalog.pg_proc as p
     where p.pronamespace = 'private'::regnamespace
       and p.proname in ('member_org_ids', 'admin_org_ids', 'owner_org_ids', 'colleague_ids')
       and p.pronargs = 1 and p.proargtypes[0] = 'uuid'::regtype
     order by 2
  loop
    select string_agg(pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid), ', ' order by 1)
      into v_users
      from pg_catalog.pg_depend as d
     where d.refclassid = 'pg_catalog.pg_proc'::regclass and d.refobjid = r.oid and d.deptype = 'n';
    if v_users is not null then
      raise exception 'the old helper % answers for any user it is asked about, and % still call(s) it', r.fn, v_users
        using errcode = 'dependent_objects_still_exist',
              hint = format('Make them call %s (the caller''s own answer, from auth.uid()), then re-run this phase.',
                            replace(r.fn, '(uuid)', '()'));
    end if;
    execute format('drop function %s', r.fn);
    raise notice 'dropped the old policy helper % (it answered for any user)', r.fn;
  end loop;
end
$$;

-- the previous release's set-returning helpers (renamed <name>_setof in section 8): the policies above no
-- longer call them. Never CASCADE: another object that still calls one stops the phase, named.
do $$
declare
  r record;
  v_users text;
begin
  for r in
    select p.oid, p.oid::regprocedure::text as fn, p.proname from pg_catalog.pg_proc as p
     where p.pronamespace = 'private'::regnamespace and p.pronargs = 0 and p.proretset
       and p.proname in ('member_org_ids_setof', 'admin_org_ids_setof', 'owner_org_ids_setof', 'colleague_ids_setof')
     order by 2
  loop
    select string_agg(pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid), ', ' order by 1)
      into v_users
      from pg_catalog.pg_depend as d
     where d.refclassid = 'pg_catalog.pg_proc'::regclass and d.refobjid = r.oid and d.deptype = 'n';
    if v_users is not null then
      raise exception 'the previous policy helper % (a set) is still called by %', r.fn, v_users
        using errcode = 'dependent_objects_still_exist',
              hint = format('Make them call private.%s() as `col = any ((select private.%s())::uuid[])`, then re-run this phase.',
                            left(r.proname, -6), left(r.proname, -6));
    end if;
    execute format('drop function %s', r.fn);
    raise notice 'dropped the previous policy helper % (it returned a set)', r.fn;
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
-- 11. After the commit (no transaction): rewrites, then indexes built concurrently
-- ====================================================================================================

-- tables that held plaintext keys are rewritten now that their old row versions are dead
-- runbook: no-transaction
do $$
declare
  r record;
  v_index text;
  v_blockers text;
  v_deadline constant timestamptz := clock_timestamp() + interval '60 seconds';
begin
  for r in select p.table_name, p.reason, p.removed_in from private.pending_rewrites as p order by p.table_name loop
    -- CLUSTER keeps every row version that some transaction may still see: a snapshot of this database
    -- older than the removal, or a transaction anywhere in the cluster that was already writing then
    -- (it holds back every snapshot's xmin, ours included). Wait (bounded) for those to end.
    loop
      perform pg_catalog.pg_stat_clear_snapshot();
      select string_agg(b.who, '; ' order by b.who) into v_blockers
        from (select format('pid %s (%s, database %s, %s, %s, since %s: %s)', a.pid, a.backend_type, coalesce(a.datname, '-'),
                            coalesce(nullif(a.application_name, ''), '-'), a.state, coalesce(a.xact_start, a.backend_start),
                            left(a.query, 60)) as who
                from pg_catalog.pg_stat_activity as a
               where a.pid <> pg_catalog.pg_backend_pid()
                 and (age(a.backend_xid) >= age(r.removed_in)
                      or (a.datname = current_database() and age(a.backend_xmin) >= age(r.removed_in)))
              union all
              select format('prepared transaction %s (database %s)', x.gid, x.database)
                from pg_catalog.pg_prepared_xacts as x
               where age(x.transaction) >= age(r.removed_in)) as b;
      exit when v_blockers is null or clock_timestamp() > v_deadline;
      perform pg_catalog.pg_sleep(0.2);
    end loop;
    if v_blockers is not null then
      raise warning '%: transactions % may still see its old row versions: not rewritten; re-run this file when they have ended',
        r.table_name, v_blockers;
      continue;
    end if;
    if to_regclass(r.table_name) is not null then
      select ic.relname into v_index
        from pg_catalog.pg_index i join pg_catalog.pg_class ic on ic.oid = i.indexrelid
       where i.indrelid = to_regclass(r.table_name) and i.indisvalid and i.indisunique and i.indpred is null
       order by i.indisprimary desc, ic.relname
       limit 1;
      if v_index is null then
        raise warning '%: no index to CLUSTER on (%): run VACUUM FULL % yourself', r.table_name, r.reason, r.table_name;
        continue;
      end if;
      execute format('cluster %s using %I', r.table_name, v_index);
      execute format('alter table %s set without cluster', r.table_name);
      raise notice '%: rewritten (%)', r.table_name, r.reason;
    end if;
    delete from private.pending_rewrites as p where p.table_name = r.table_name;
  end loop;
end
$$;

-- unique rules missing on tables that hold rows: built without blocking writes, then attached
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
    execute format('alter table %s add constraint %I unique using index %I', r.tbl, r.name, r.name);
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
