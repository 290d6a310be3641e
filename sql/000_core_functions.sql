-- 000_core_functions.sql: one updated-at trigger function, the guide's helpers, legacy duplicates re-pointed and dropped
-- Deploys: schema private; private.replication_backlog(); public.update_updated_at_column(); public.get_user_organization_id(uuid);
--          public.is_org_member(uuid, uuid); public.is_org_admin(uuid, uuid); public.validate_sku(text);
--          public.validate_org_slug(text); one trigger update_<table>_updated_at on every table that
--          had an updated-at trigger and on every public table with an updated_at column.
-- Requires: PostgreSQL 15+; Supabase's auth schema (auth.uid()) and roles anon, authenticated and
--           service_role (on plain PostgreSQL: sql/support/supabase_shim.sql); run as the role that
--           owns the public tables and the legacy functions.
--
-- Notes
-- * Idempotent: re-running changes nothing. No transaction control in here: the runbook engine
--   wraps the file in one transaction; `psql -v ON_ERROR_STOP=1 -f` runs it statement by statement.
-- * An "updated-at function" is a trigger function (in any schema but PostgreSQL's and Supabase's own)
--   whose body does nothing but stamp NEW.<column> with the current time and return NEW (optionally
--   only when the row changed), or a moddatetime-style function that stamps the column its trigger
--   names (TG_ARGV[0]); the C moddatetime of the extension counts too. It is recognised by its
--   body, whatever its name. A trigger function NAMED like one (update_/set_/handle_/touch_...
--   updated_at/modified/timestamp, moddatetime) whose body does more is not guessed at: the phase
--   stops and names it, as it does for one that stamps another column than updated_at.
-- * Every trigger calling an updated-at function (or calling update_updated_at_column() under
--   another name) is replaced by one trigger per table, update_<table>_updated_at, BEFORE UPDATE
--   FOR EACH ROW, calling public.update_updated_at_column(); then the duplicates are dropped
--   without CASCADE (an unexpected dependent stops the phase). Extension members are not dropped.
-- * Overloads of the contract's function names in public with another signature or result (e.g.
--   is_org_member(org uuid), is_org_admin(text, text), get_user_organization_id()) are dropped.
--   One that a policy calls is moved out of the API's way instead, as private.retired_<name>
--   (marked by its comment): the legacy policies keep working, unchanged, until 001_core_schema.sql
--   replaces them and drops it. A check constraint that depends on one is dropped (phase 2 adds the
--   contract's rules). Any other dependent stops the phase and is named.
-- * Permissions: the guide's helpers run as their owner (SECURITY DEFINER, search_path ''), are not
--   executable by anon or authenticated, and stay callable by the owner (the DBA) and service_role.
--   validate_sku() and validate_org_slug() are pure functions that the table rules call, so
--   authenticated may execute them (a CHECK constraint needs EXECUTE of the writer).

-- prerequisites: PostgreSQL 15+, the auth schema and the API roles
do $$
declare
  v_missing text[];
begin
  if current_setting('server_version_num')::int < 150000 then
    raise exception '000_core_functions.sql requires PostgreSQL 15 or later (this is %)', current_setting('server_version')
      using errcode = 'object_not_in_prerequisite_state';
  end if;
  if to_regprocedure('auth.uid()') is null then
    raise exception '000_core_functions.sql requires Supabase''s auth schema with auth.uid()'
      using errcode = 'object_not_in_prerequisite_state',
            hint = 'On plain PostgreSQL apply sql/support/supabase_shim.sql first.';
  end if;
  select array_agg(r) into v_missing
    from unnest(array['anon', 'authenticated', 'service_role']) as r
   where not exists (select 1 from pg_catalog.pg_roles where rolname = r);
  if v_missing is not null then
    raise exception '000_core_functions.sql requires the Supabase roles %', array_to_string(v_missing, ', ')
      using errcode = 'object_not_in_prerequisite_state',
            hint = 'On plain PostgreSQL apply sql/support/supabase_shim.sql first.';
  end if;
end
$$;

-- schema private: SECURITY DEFINER helpers that policies call, never exposed through the API
create schema if not exists private;
revoke all on schema private from public;
grant usage on schema private to authenticated, service_role;
comment on schema private is 'TruthSource helpers that policies and triggers call; not exposed through the API.';

-- migration helpers for this file only (in pg_temp: they vanish with the session)
create or replace function pg_temp.p1_managed_schemas() returns text[]
language sql immutable
as $fn$
  select array['pg_catalog', 'information_schema', 'pg_toast', 'auth', 'storage', 'realtime', '_realtime',
               'graphql', 'graphql_public', 'vault', 'pgsodium', 'pgsodium_masks', 'net', 'cron',
               'supabase_functions', 'supabase_migrations', '_analytics', 'pgbouncer', 'truthsource']
$fn$;

-- does a name look like an updated-at function's (update_/set_/handle_/touch_... updated_at/modified/timestamp)?
create or replace function pg_temp.p1_named_like_updated_at(p_name text) returns boolean
language sql immutable
as $fn$
  select p_name = 'moddatetime'
      or p_name ~ '^(update|set|handle|touch|trigger_set|bump|refresh)_([a-z0-9_]*_)?(updated_at|modified_at|modified|timestamp|timestamps|updated|update_time|modtime|mod_time)(_[a-z0-9_]+)?$'
$fn$;

-- the column(s) a trigger function only stamps with the current time (comma-separated),
-- '$argv' for a moddatetime-style function, or null when its body does anything else
create or replace function pg_temp.p1_stamped_column(p_fn oid) returns text
language plpgsql stable
as $fn$
declare
  v_time constant text := '(now\(\)|current_timestamp|clock_timestamp\(\)|statement_timestamp\(\)|transaction_timestamp\(\)|localtimestamp)';
  v_assign constant text := 'new\.("?[a-z_][a-z0-9_$]*"?) ?:?= ?([^;]*?) ?;';
  v_argv constant text := 'new ?:= ?jsonb?_populate_record ?\( ?new ?, ?jsonb?_build_object ?\( ?tg_argv ?\[ ?0 ?\] ?, ?([^;]*?) ?\) ?\) ?;';
  v_lang text;
  v_src text;
  v_rettype oid;
  v_cols text[] := '{}';
  v_is_argv boolean := false;
  m text[];
begin
  select l.lanname, lower(p.prosrc), p.prorettype into v_lang, v_src, v_rettype
    from pg_catalog.pg_proc p join pg_catalog.pg_language l on l.oid = p.prolang
   where p.oid = p_fn;
  if v_rettype is distinct from 'pg_catalog.trigger'::pg_catalog.regtype then
    return null;
  end if;
  if v_lang = 'c' and v_src = 'moddatetime' then
    return '$argv';
  end if;
  if v_lang is distinct from 'plpgsql' then
    return null;
  end if;
  v_src := regexp_replace(v_src, '/\*.*?\*/', ' ', 'g');
  v_src := regexp_replace(v_src, '--[^\n]*', ' ', 'g');
  v_src := regexp_replace(v_src, '\s+', ' ', 'g');
  v_src := regexp_replace(v_src, ' ?([();,:=\[\]]) ?', '\1', 'g');
  v_src := regexp_replace(v_src, ':=', ' := ', 'g');
  v_src := regexp_replace(v_src, '([^:<>!])=', '\1 = ', 'g');
  -- moddatetime style
  for m in select regexp_matches(v_src, v_argv, 'g') loop
    if m[1] !~ ('^[a-z0-9_(),:''. ]*' || v_time || '[a-z0-9_(),:''. ]*$') then
      return null;
    end if;
    v_is_argv := true;
  end loop;
  v_src := regexp_replace(v_src, v_argv, ' ', 'g');
  -- NEW.<column> := <current time>;
  for m in select regexp_matches(v_src, v_assign, 'g') loop
    if m[2] !~ ('^[a-z0-9_(),:''. ]*' || v_time || '[a-z0-9_(),:''. ]*$') or m[2] ~ '(select|new\.|old\.)' then
      return null;
    end if;
    v_cols := v_cols || replace(m[1], '"', '');
  end loop;
  v_src := regexp_replace(v_src, v_assign, ' ', 'g');
  -- what may remain: block keywords, RETURN NEW/OLD, and an "only when the row changed" guard
  v_src := regexp_replace(v_src, 'if ?(row ?\()?new(\.\*)?\)? ?is distinct from ?(row ?\()?old(\.\*)?\)? ?then', ' ', 'g');
  v_src := regexp_replace(v_src, 'if tg_op = ''update'' then', ' ', 'g');
  v_src := regexp_replace(v_src, '\m(declare|begin|end if|end|else|return new|return old)\M', ' ', 'g');
  if v_src !~ '^[ ;]*$' then
    return null;
  end if;
  if v_is_argv and cardinality(v_cols) = 0 then
    return '$argv';
  end if;
  if v_is_argv or cardinality(v_cols) = 0 then
    return null;
  end if;
  return (select string_agg(distinct c, ',') from unnest(v_cols) as c);
end
$fn$;

-- retire one function from public. A legacy policy that calls it keeps working until 001_core_schema.sql
-- replaces the policies: the function is then moved out of the API's way rather than dropped (a policy
-- calls it by oid, so it survives a rename and a new schema), as private.retired_<name>, marked by
-- its comment; 001_core_schema.sql drops it. Without such a policy it is dropped at once.
create or replace function pg_temp.p1_retire_function(p_fn regprocedure) returns void
language plpgsql
as $fn$
declare
  d record;
  pol record;
  v_policies text[] := '{}';
  v_retired text;
  v_was constant text := (select format('public.%I(%s)', p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid))
                            from pg_catalog.pg_proc p where p.oid = p_fn);
begin
  for d in
    select dep.classid, dep.objid, dep.objsubid
      from pg_catalog.pg_depend dep
     where dep.refclassid = 'pg_catalog.pg_proc'::regclass and dep.refobjid = p_fn and dep.deptype = 'n'
     order by dep.objid
  loop
    if d.classid = 'pg_catalog.pg_policy'::regclass then
      select format('policy %I on %s', p.polname, p.polrelid::regclass) into v_retired
        from pg_catalog.pg_policy p where p.oid = d.objid;
      v_policies := v_policies || v_retired;
    elsif d.classid = 'pg_catalog.pg_constraint'::regclass
          and (select c.contype from pg_catalog.pg_constraint c where c.oid = d.objid) = 'c' then
      select c.conname, c.conrelid::regclass as tbl into pol from pg_catalog.pg_constraint c where c.oid = d.objid;
      raise notice 'check constraint % on % calls %, which is retired: dropped (001_core_schema.sql adds the contract''s rules)',
        quote_ident(pol.conname), pol.tbl, p_fn;
      execute format('alter table %s drop constraint %I', pol.tbl, pol.conname);
    else
      raise exception 'cannot retire function %: % depends on it', p_fn, pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid)
        using errcode = 'dependent_objects_still_exist',
              hint = 'Change or drop that object so that it no longer calls the function, then re-run this file.';
    end if;
  end loop;
  if cardinality(v_policies) = 0 then
    raise notice 'dropping function %, which clashes with the contract''s signatures', p_fn;
    execute format('drop function %s', p_fn);
    return;
  end if;
  -- retired_<name>, or retired_<name>_2, _3... when one of those arguments is there already (in public or private)
  select format('retired_%s%s', left(p.proname, 40), case when n > 1 then '_' || n end) into v_retired
    from pg_catalog.pg_proc p, generate_series(1, 1000) as n
   where p.oid = p_fn
     and not exists (select 1 from pg_catalog.pg_proc o
                      where o.pronamespace in ('public'::regnamespace, 'private'::regnamespace)
                        and o.proname = format('retired_%s%s', left(p.proname, 40), case when n > 1 then '_' || n end)
                        and o.proargtypes = p.proargtypes)
   order by n limit 1;
  raise notice 'function %, which clashes with the contract''s signatures, renamed private.% until 001_core_schema.sql replaces the legacy policies that call it (%)',
    v_was, v_retired, array_to_string(v_policies, ', ');
  execute format('comment on function %s is %L', p_fn,
    format('Retired by 000_core_functions.sql: was %s, kept only for the legacy policies that call it; 001_core_schema.sql drops it.', v_was));
  execute format('alter function %s rename to %I', p_fn, v_retired);
  execute format('alter function %s set schema private', p_fn::oid::regprocedure);
end
$fn$;

-- retire overloads that clash with the contract's signatures (and a same-named function of another result)
do $$
declare
  r record;
begin
  for r in
    select p.oid::regprocedure as fn
      from pg_catalog.pg_proc p
      join (values
        ('update_updated_at_column', '', 'trigger'),
        ('get_user_organization_id', 'user_uuid uuid', 'uuid'),
        ('is_org_member', 'user_uuid uuid, org_uuid uuid', 'boolean'),
        ('is_org_admin', 'user_uuid uuid, org_uuid uuid', 'boolean'),
        ('validate_sku', 'sku text', 'boolean'),
        ('validate_org_slug', 'slug text', 'boolean')
      ) as contract(name, arguments, result) on contract.name = p.proname
     where p.pronamespace = 'public'::regnamespace
       and (p.prokind <> 'f'
            or pg_catalog.pg_get_function_arguments(p.oid) <> contract.arguments
            or pg_catalog.pg_get_function_result(p.oid) <> contract.result)
     order by p.oid::regprocedure::text
  loop
    perform pg_temp.p1_retire_function(r.fn);
  end loop;
end
$$;

-- the one updated-at trigger function
create or replace function public.update_updated_at_column()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end;
$$;
comment on function public.update_updated_at_column() is
  'Trigger function: sets NEW.updated_at = now(). The only updated-at function; every table with updated_at has a BEFORE UPDATE trigger update_<table>_updated_at calling it. Not callable directly: update a row and watch updated_at move.';

-- the guide's helpers (tables come in 001_core_schema.sql: plpgsql resolves them when called)
create or replace function public.get_user_organization_id(user_uuid uuid)
returns uuid
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  v_org uuid;
begin
  select p.organization_id into v_org from public.profiles as p where p.id = user_uuid;
  if v_org is null then
    select m.organization_id into v_org
      from public.organization_members as m
     where m.user_id = user_uuid
     order by m.created_at, m.organization_id
     limit 1;
  end if;
  return v_org;
end;
$$;
comment on function public.get_user_organization_id(uuid) is
  'The user''s organization: profiles.organization_id, else their earliest membership; NULL if none.';

-- helper: membership, any role
create or replace function public.is_org_member(user_uuid uuid, org_uuid uuid)
returns boolean
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
  return exists (
    select 1 from public.organization_members as m
     where m.user_id = user_uuid and m.organization_id = org_uuid
  );
end;
$$;
comment on function public.is_org_member(uuid, uuid) is
  'True when the user belongs to the organization, whatever the role.';

-- helper: owner or admin
create or replace function public.is_org_admin(user_uuid uuid, org_uuid uuid)
returns boolean
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
  return exists (
    select 1 from public.organization_members as m
     where m.user_id = user_uuid and m.organization_id = org_uuid and m.role in ('owner', 'admin')
  );
end;
$$;
comment on function public.is_org_admin(uuid, uuid) is
  'True when the user is an owner or admin of the organization.';

-- validation: SKU format (used by products_sku_format_check). The length is tested apart: a bounded
-- repetition ({2,63}) made PostgreSQL's regex 12x slower, and every row of products is validated.
create or replace function public.validate_sku(sku text)
returns boolean
language sql
immutable
parallel safe
set search_path = ''
as $$
  select coalesce(length(sku) between 3 and 64 and sku ~ '^[A-Z0-9][A-Z0-9_-]*$', false)
$$;
comment on function public.validate_sku(text) is
  'A valid SKU: 3 to 64 characters of A-Z, 0-9, - and _, starting with a letter or digit.';

-- validation: organization slug format (used by organizations_slug_format_check)
create or replace function public.validate_org_slug(slug text)
returns boolean
language sql
immutable
parallel safe
set search_path = ''
as $$
  select coalesce(length(slug) between 3 and 63 and slug ~ '^[a-z0-9]+(-[a-z0-9]+)*$', false)
$$;
comment on function public.validate_org_slug(text) is
  'A valid organization slug: 3 to 63 characters, lowercase letters and digits, single hyphens between them.';

-- What the long data steps of the later phases wait for between two batches (001_core_schema.sql after its
-- commit): a streaming replica further behind than truthsource.max_replica_lag seconds (default 10; 0 or
-- off: never wait), or WAL archiving further behind than truthsource.max_archive_backlog segments waiting
-- (default 64; 0 or off: never wait). The reason as text ('replica 14 s behind (standby1, 120 MB to
-- replay)', 'WAL archiving 40 segments behind'), or NULL: nothing behind, nothing streams or archives, or
-- the caller may not read those figures (pg_read_all_stats for the replicas' lag, pg_monitor for the
-- archive's status directory). A replica whose replay is stuck shows a lag that grows (PostgreSQL
-- estimates it from the WAL sent since); one that has replayed all there is is not behind, whatever lag it
-- reported last.
create or replace function private.replication_backlog() returns text
language plpgsql
volatile
set search_path = ''
as $$
declare
  v_lag_setting constant text := lower(btrim(coalesce(current_setting('truthsource.max_replica_lag', true), '')));
  v_archive_setting constant text := lower(btrim(coalesce(current_setting('truthsource.max_archive_backlog', true), '')));
  v_now constant numeric := extract(epoch from pg_catalog.clock_timestamp());
  v_current constant pg_catalog.pg_lsn := pg_catalog.pg_current_wal_lsn();
  v_max_lag numeric;
  v_max_ready bigint;
  v_ready bigint;
  v_reason text;
  v_lsns pg_catalog.pg_lsn[];
  v_times numeric[];
begin
  if v_lag_setting !~ '^(|off|[0-9]+(\.[0-9]+)?)$' then
    raise exception 'truthsource.max_replica_lag is %: a number of seconds, or off', quote_literal(v_lag_setting)
      using errcode = 'invalid_parameter_value';
  end if;
  if v_archive_setting !~ '^(|off|[0-9]+)$' then
    raise exception 'truthsource.max_archive_backlog is %: a number of WAL segments, or off', quote_literal(v_archive_setting)
      using errcode = 'invalid_parameter_value';
  end if;
  v_max_lag := case v_lag_setting when '' then 10 when 'off' then 0 else v_lag_setting::numeric end;
  v_max_ready := case v_archive_setting when '' then 64 when 'off' then 0 else v_archive_setting::bigint end;
  if v_max_lag > 0 then
    -- A replica is as far behind as the oldest WAL position it has not replayed: this session notes
    -- (position, time) at each call in truthsource.replica_lag_samples (a setting: no table, so read-only
    -- sessions too) and keeps those some replica has not replayed yet. pg_stat_replication's replay_lag
    -- alone would not do: it stays NULL for a standby whose replay stopped right after it caught up, and
    -- keeps an old figure once it has caught up until it replays again; it serves only a first call.
    select coalesce(array_agg(pg_catalog.split_part(x, '@', 1)::pg_catalog.pg_lsn order by n), '{}'),
           coalesce(array_agg(pg_catalog.split_part(x, '@', 2)::numeric order by n), '{}')
      into v_lsns, v_times
      from pg_catalog.unnest(pg_catalog.string_to_array(
             nullif(current_setting('truthsource.replica_lag_samples', true), ''), ';')) with ordinality as t (x, n);
    select format('replica %s s behind (%s, %s to replay)', round(r.behind_s),
                  coalesce(nullif(r.application_name, ''), host(r.client_addr), 'standby'),
                  pg_catalog.pg_size_pretty(pg_catalog.pg_wal_lsn_diff(v_current, r.replay_lsn)))
      into v_reason
      from (select r.application_name, r.client_addr, r.replay_lsn,
                   case when cardinality(v_lsns) = 0 then extract(epoch from r.replay_lag)
                        else (select v_now - min(s.at) from unnest(v_lsns, v_times) as s (lsn, at) where s.lsn > r.replay_lsn)
                   end as behind_s
              from pg_catalog.pg_stat_replication as r
             where r.replay_lsn < v_current) as r
     where r.behind_s > v_max_lag
     order by r.behind_s desc
     limit 1;
    -- kept: the samples some replica has not replayed, this call's among them: the oldest (it says how far
    -- behind) and the newest 200 (they say it once the replica passes the oldest)
    perform set_config('truthsource.replica_lag_samples', coalesce((
      select string_agg(format('%s@%s', s.lsn, s.at), ';' order by s.at)
        from (select s.*, row_number() over (order by s.at) as oldest, row_number() over (order by s.at desc) as newest
                from unnest(v_lsns || v_current, v_times || v_now) as s (lsn, at)
               where exists (select from pg_catalog.pg_stat_replication as r where r.replay_lsn < s.lsn)) as s
       where s.oldest = 1 or s.newest <= 200), ''), false);
    if v_reason is not null then
      return v_reason;
    end if;
  end if;
  if v_max_ready > 0 and current_setting('archive_mode') <> 'off' then
    begin
      select count(*) into v_ready from pg_catalog.pg_ls_archive_statusdir() as f where f.name like '%.ready';
    exception when insufficient_privilege then
      v_ready := null;
    end;
    if v_ready > v_max_ready then
      return format('WAL archiving %s segments behind', v_ready);
    end if;
  end if;
  return null;
end
$$;
comment on function private.replication_backlog() is
  'Why batches should wait now (a replica behind truthsource.max_replica_lag seconds, WAL archiving behind truthsource.max_archive_backlog segments), or NULL.';
revoke all on function private.replication_backlog() from public, anon, authenticated;

-- consolidate the updated-at functions: re-point every trigger, then drop the duplicates
do $$
declare
  v_canonical constant oid := 'public.update_updated_at_column()'::regprocedure;
  v_functions oid[] := '{}';
  v_problems text[] := '{}';
  v_tables oid[] := '{}';
  v_col text;
  v_name text;
  r record;
begin
  -- the updated-at functions, recognised by body
  for r in
    select p.oid, p.oid::regprocedure as fn, p.proname
      from pg_catalog.pg_proc p
      join pg_catalog.pg_namespace n on n.oid = p.pronamespace
     where p.prorettype = 'pg_catalog.trigger'::regtype
       and p.oid <> v_canonical
       and n.nspname <> all (pg_temp.p1_managed_schemas())
       and n.nspname !~ '^pg_'
     order by p.oid::regprocedure::text
  loop
    v_col := pg_temp.p1_stamped_column(r.oid);
    if v_col is null then
      if pg_temp.p1_named_like_updated_at(r.proname) then
        v_problems := v_problems || format('%s is named like an updated-at function but does more than stamp updated_at', r.fn);
      end if;
    elsif v_col not in ('updated_at', '$argv') then
      v_problems := v_problems || format('%s stamps %s, not updated_at', r.fn, v_col);
    else
      v_functions := v_functions || r.oid;
    end if;
  end loop;

  -- their triggers (and update_updated_at_column() triggers under any name): what do they stamp?
  for r in
    select t.tgrelid, t.tgrelid::regclass as tbl, t.tgname, t.tgfoid,
           (string_to_array(encode(t.tgargs, 'escape'), '\000'))[1] as first_arg,
           exists (select 1 from pg_catalog.pg_attribute a
                    where a.attrelid = t.tgrelid and a.attname = 'updated_at' and not a.attisdropped) as has_column
      from pg_catalog.pg_trigger t
     where not t.tgisinternal and t.tgparentid = 0
       and t.tgfoid = any (v_functions || v_canonical)
     order by t.tgrelid::regclass::text, t.tgname
  loop
    if pg_temp.p1_stamped_column(r.tgfoid) = '$argv' and r.first_arg is distinct from 'updated_at' then
      v_problems := v_problems || format('trigger %s on %s stamps %s, not updated_at', r.tgname, r.tbl, coalesce(r.first_arg, '(no column named)'));
    elsif not r.has_column then
      v_problems := v_problems || format('trigger %s on %s stamps updated_at, which %s does not have', r.tgname, r.tbl, r.tbl);
    elsif not r.tgrelid = any (v_tables) then
      v_tables := v_tables || r.tgrelid;
    end if;
  end loop;

  if cardinality(v_problems) > 0 then
    raise exception 'updated-at consolidation stopped: %', array_to_string(v_problems, '; ')
      using errcode = 'object_not_in_prerequisite_state',
            hint = 'Phase 1 converges only functions that just stamp updated_at. Rename the column to updated_at, or fold the extra behaviour into a trigger of its own, then re-run this file.';
  end if;

  -- every public table with an updated_at timestamp gets the trigger as well
  select v_tables || coalesce(array_agg(c.oid order by c.oid), '{}') into v_tables
    from pg_catalog.pg_class c
    join pg_catalog.pg_attribute a on a.attrelid = c.oid and a.attname = 'updated_at' and not a.attisdropped
   where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p') and not c.relispartition
     and a.atttypid in ('timestamptz'::regtype, 'timestamp'::regtype)
     and not c.oid = any (v_tables);

  -- one canonical trigger per table; the others go
  for r in
    select c.oid, c.oid::regclass as tbl, c.relname from pg_catalog.pg_class c
     where c.oid = any (v_tables) order by c.oid::regclass::text
  loop
    v_name := left('update_' || r.relname || '_updated_at', 63);
    execute format('create or replace trigger %I before update on %s for each row execute function public.update_updated_at_column()',
                   v_name, r.tbl);
    for v_col in
      select t.tgname from pg_catalog.pg_trigger t
       where t.tgrelid = r.oid and not t.tgisinternal and t.tgname <> v_name
         and t.tgfoid = any (v_functions || v_canonical)
       order by 1
    loop
      raise notice 'trigger % on % replaced by %', quote_ident(v_col), r.tbl, quote_ident(v_name);
      execute format('drop trigger %I on %s', v_col, r.tbl);
    end loop;
  end loop;

  -- the duplicates have no trigger left: drop them (never CASCADE)
  for r in
    select p.oid::regprocedure as fn,
           exists (select 1 from pg_catalog.pg_depend d
                    where d.classid = 'pg_catalog.pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e') as in_extension
      from pg_catalog.pg_proc p where p.oid = any (v_functions) order by p.oid::regprocedure::text
  loop
    if r.in_extension then
      raise notice 'function % belongs to an extension: its triggers now call public.update_updated_at_column(); drop the extension when nothing else uses it', r.fn;
    else
      raise notice 'dropping duplicate updated-at function %', r.fn;
      execute format('drop function %s', r.fn);
    end if;
  end loop;
end
$$;

-- permissions: the guide's helpers are for the DBA and service_role; validation for every writer
revoke all on function public.update_updated_at_column() from public, anon, authenticated;
revoke all on function public.get_user_organization_id(uuid) from public, anon, authenticated;
revoke all on function public.is_org_member(uuid, uuid) from public, anon, authenticated;
revoke all on function public.is_org_admin(uuid, uuid) from public, anon, authenticated;
revoke all on function public.validate_sku(text) from public, anon;
revoke all on function public.validate_org_slug(text) from public, anon;
grant execute on function public.get_user_organization_id(uuid) to service_role;
grant execute on function public.is_org_member(uuid, uuid) to service_role;
grant execute on function public.is_org_admin(uuid, uuid) to service_role;
grant execute on function public.validate_sku(text) to authenticated, service_role;
grant execute on function public.validate_org_slug(text) to authenticated, service_role;
