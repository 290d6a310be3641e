-- 002_production_enhancements.sql: validation, security, monitoring, retention and compliance (the guide's production-deployment.sql)
-- Deploys: tables public.rate_limits, threat_intelligence, data_retention_policies (with default policies),
--          backup_verifications; validation and audit triggers on the core tables; functions
--          public.log_security_event, check_rate_limit, detect_suspicious_activity, get_database_stats,
--          verify_data_integrity, apply_data_retention, export_user_data, anonymize_user; in private: the
--          trigger functions (validate_*, audit_row_change, rule_violation) and export_user_data,
--          erase_update, pseudonymise_jsonb, blank_personal.
-- Requires: 000_core_functions.sql and 001_core_schema.sql (checked below: the file stops at once without them).
--
-- Notes
-- * Idempotent; no transaction control in here. The runbook engine runs the body in one transaction, then
--   the index builds marked as no-transaction at the end, each on its own; psql -f runs it statement by
--   statement.
-- * Validation triggers check what a CHECK constraint cannot (other rows, other tables, the caller).
--   They fire only when the columns they guard change (INSERT, or UPDATE OF those columns), so an
--   update of other columns of a legacy row, an anonymisation or a retention run is never blocked by
--   them. Errors carry SQLSTATE 23514 (check_violation) and the rule's name as constraint name and at
--   the start of the message:
--     inventory_organization_matches_product_check  inventory belongs to its product's organization
--                                                   (an INSERT without organization_id takes the product's)
--     <table>_organization_immutable_check           products, inventory, api_keys and memberships never
--                                                   move to another organization
--     api_keys_revocation_final_check                a revoked key stays revoked; its key_hash never changes
--     profiles_organization_membership_check         (API users) a profile points at one of the user's organizations
--     organization_members_owner_change_check        (API users) only an owner grants, changes or removes an owner
--     organization_members_last_owner_check          (API users) an organization keeps at least one owner
--   The (API users) rules apply to the role authenticated only: service_role and the DBA administer.
-- * Audit trail: every INSERT, UPDATE (that changes something) and DELETE on organizations,
--   organization_members, products, inventory and api_keys appends an audit_logs row (key_hash left
--   out) with auth.uid(), the client address and user agent from PostgREST's request.headers.
--   Profiles are not audited: they are personal data.
-- * Functions that are not for clients (all but export_user_data) are executable by service_role and
--   the owner only. SECURITY DEFINER ones pin search_path to ''. export_user_data is the client
--   function: a SECURITY INVOKER wrapper in public over a SECURITY DEFINER body in private; an
--   authenticated user may export only their own data, anon nothing, service_role and the DBA anyone.
-- * check_rate_limit counts in fixed windows aligned on multiples of p_window (date_bin; windows of
--   months or years are refused); use one window length per key. detect_suspicious_activity reads
--   rate-limit rows whose key is 'ip:<address>' or 'user:<uuid>', optionally followed by '/<anything>'.
-- * apply_data_retention only ever touches the log tables that data_retention_policies allows (a check
--   constraint lists them), deletes as the table owner (the logs are append-only for everyone else),
--   and records each real run in audit_logs. Dry run (the default) changes nothing.
-- * anonymize_user: memberships end; the profile stays without personal data; the auth account's e-mail
--   and metadata are replaced (deleting the account itself is Supabase Auth's job); api keys lose their
--   creator; audit rows and security events stay, pseudonymised with one random uuid per erasure
--   (user ids replaced, addresses and user agents removed, personal values in their json blanked).
--   A legacy row that breaks a NOT VALID rule would make any UPDATE of it fail, erasure included: for
--   the erasure alone such a rule steps aside (dropped and re-added NOT VALID, same definition, in the
--   same transaction, so no other session ever sees it missing); the row's other values are untouched.
-- * The four tables here are closed to clients: RLS enabled, no grant to anon or authenticated, and one
--   policy saying so (<table>_no_client_access: to authenticated, using (false), with check (false)),
--   so that Supabase's advisor sees an explicit decision rather than a table without policies. Only
--   service_role (which bypasses RLS) and the owner use them. A legacy table of the same name in another
--   shape stops the phase (named in the error): this file does not guess at them.

-- prerequisites: phases 1 and 2
do $$
begin
  if to_regprocedure('public.update_updated_at_column()') is null or to_regnamespace('private') is null then
    raise exception '002_production_enhancements.sql requires 000_core_functions.sql and 001_core_schema.sql: apply them first'
      using errcode = 'object_not_in_prerequisite_state';
  end if;
  if to_regprocedure('private.member_org_ids()') is null or to_regclass('public.security_events') is null
     or to_regclass('private.pending_rewrites') is null or to_regclass('private.pending_redactions') is null
     or to_regclass('private.pending_backfills') is null
     or to_regclass('public.audit_logs') is null or to_regclass('public.api_keys') is null
     or to_regclass('public.organization_members') is null or to_regclass('public.inventory') is null then
    raise exception '002_production_enhancements.sql requires 001_core_schema.sql: apply it first'
      using errcode = 'object_not_in_prerequisite_state';
  end if;
end
$$;

-- the tables of this phase must be absent or in this phase's shape (no guessing at legacy ones)
do $$
declare
  v_problems text[];
begin
  select array_agg(format('%s.%s is %s (expected %s)', x.tbl, x.col, coalesce(pg_catalog.format_type(a.atttypid, a.atttypmod), 'missing'), x.typ)
                   order by x.tbl, x.col)
    into v_problems
    from (values
      ('rate_limits', 'key', 'text'), ('rate_limits', 'window_start', 'timestamp with time zone'),
      ('rate_limits', 'window_length', 'interval'), ('rate_limits', 'max_requests', 'bigint'),
      ('rate_limits', 'request_count', 'bigint'), ('rate_limits', 'last_request_at', 'timestamp with time zone'),
      ('threat_intelligence', 'id', 'uuid'), ('threat_intelligence', 'ip_address', 'inet'),
      ('threat_intelligence', 'threat_type', 'text'), ('threat_intelligence', 'severity', 'text'),
      ('threat_intelligence', 'source', 'text'), ('threat_intelligence', 'description', 'text'),
      ('threat_intelligence', 'first_seen_at', 'timestamp with time zone'), ('threat_intelligence', 'last_seen_at', 'timestamp with time zone'),
      ('threat_intelligence', 'expires_at', 'timestamp with time zone'), ('threat_intelligence', 'created_at', 'timestamp with time zone'),
      ('threat_intelligence', 'updated_at', 'timestamp with time zone'),
      ('data_retention_policies', 'table_name', 'text'), ('data_retention_policies', 'timestamp_column', 'text'),
      ('data_retention_policies', 'retention_period', 'interval'), ('data_retention_policies', 'is_enabled', 'boolean'),
      ('data_retention_policies', 'description', 'text'), ('data_retention_policies', 'created_at', 'timestamp with time zone'),
      ('data_retention_policies', 'updated_at', 'timestamp with time zone'),
      ('backup_verifications', 'id', 'uuid'), ('backup_verifications', 'run_id', 'text'),
      ('backup_verifications', 'backup_label', 'text'), ('backup_verifications', 'backup_format', 'text'),
      ('backup_verifications', 'backup_sha256', 'text'), ('backup_verifications', 'backup_bytes', 'bigint'),
      ('backup_verifications', 'toc_entries', 'bigint'), ('backup_verifications', 'status', 'text'),
      ('backup_verifications', 'details', 'jsonb'), ('backup_verifications', 'verified_by', 'text'),
      ('backup_verifications', 'verified_at', 'timestamp with time zone'), ('backup_verifications', 'created_at', 'timestamp with time zone')
    ) as x (tbl, col, typ)
    left join pg_catalog.pg_attribute a
      on a.attrelid = to_regclass('public.' || x.tbl) and a.attname = x.col and a.attnum > 0 and not a.attisdropped
   where to_regclass('public.' || x.tbl) is not null
     and pg_catalog.format_type(a.atttypid, a.atttypmod) is distinct from x.typ;
  if v_problems is not null then
    raise exception '002_production_enhancements.sql: existing tables are in another shape: %', array_to_string(v_problems, '; ')
      using errcode = 'object_not_in_prerequisite_state',
            hint = 'Rename the legacy table (e.g. to <name>_legacy) or bring it to this shape, then re-run this file.';
  end if;
end
$$;

-- functions of this phase's names with another signature or result are dropped (never CASCADE)
do $$
declare
  r record;
begin
  for r in
    select p.oid::regprocedure as fn
      from pg_catalog.pg_proc p
      join (values
        ('log_security_event', 'p_event_type text, p_severity text, p_org_id uuid, p_user_id uuid, p_ip_address inet, p_details jsonb', 'uuid'),
        ('check_rate_limit', 'p_key text, p_max_requests integer, p_window interval', 'boolean'),
        ('detect_suspicious_activity', 'p_org_id uuid, p_ip_address inet, p_user_id uuid', 'TABLE(is_suspicious boolean, risk_score integer, reasons text[])'),
        ('get_database_stats', '', 'TABLE(table_name text, row_count bigint, total_bytes bigint, index_bytes bigint, seq_scans bigint, index_scans bigint, dead_rows bigint, last_vacuum timestamp with time zone, last_analyze timestamp with time zone)'),
        ('verify_data_integrity', '', 'TABLE(check_name text, status text, affected_rows bigint, details text)'),
        ('apply_data_retention', 'p_dry_run boolean DEFAULT true', 'TABLE(table_name text, rows_affected bigint)'),
        ('export_user_data', 'p_user_id uuid', 'jsonb'),
        ('anonymize_user', 'p_user_id uuid', 'void')
      ) as contract (name, arguments, result) on contract.name = p.proname
     where p.pronamespace = 'public'::regnamespace
       and (p.prokind <> 'f'
            or pg_catalog.pg_get_function_arguments(p.oid) <> contract.arguments
            or pg_catalog.pg_get_function_result(p.oid) <> contract.result)
     order by p.oid::regprocedure::text
  loop
    raise notice 'dropping function %, which clashes with the contract''s signature', r.fn;
    execute format('drop function %s', r.fn);
  end loop;
end
$$;

-- security: rate limits (one row per key and window)
create table if not exists public.rate_limits (
  key text not null,
  window_start timestamptz not null,
  window_length interval not null,
  max_requests bigint not null,
  request_count bigint not null default 0,
  last_request_at timestamptz not null default now(),
  constraint rate_limits_pkey primary key (key, window_start),
  constraint rate_limits_key_not_blank_check check (btrim(key) <> ''),
  constraint rate_limits_max_requests_positive_check check (max_requests > 0),
  constraint rate_limits_request_count_nonnegative_check check (request_count >= 0),
  constraint rate_limits_window_positive_check check (window_length > interval '0')
);
comment on table public.rate_limits is 'Requests counted per key and fixed window by check_rate_limit(); keys ip:<address>[/...] and user:<uuid>[/...] feed detect_suspicious_activity().';

-- security: threat intelligence (addresses and networks known to be hostile)
create table if not exists public.threat_intelligence (
  id uuid not null default gen_random_uuid(),
  ip_address inet not null,
  threat_type text not null,
  severity text not null default 'medium',
  source text,
  description text,
  first_seen_at timestamptz not null default now(),
  last_seen_at timestamptz not null default now(),
  expires_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint threat_intelligence_pkey primary key (id),
  constraint threat_intelligence_ip_address_threat_type_key unique (ip_address, threat_type),
  constraint threat_intelligence_severity_check check (severity in ('low', 'medium', 'high', 'critical')),
  constraint threat_intelligence_threat_type_not_blank_check check (btrim(threat_type) <> ''),
  constraint threat_intelligence_seen_order_check check (last_seen_at >= first_seen_at)
);
comment on table public.threat_intelligence is 'Hostile addresses or networks (ip_address may be a network: 203.0.113.0/24); read by detect_suspicious_activity().';

-- retention: which log table keeps rows how long
create table if not exists public.data_retention_policies (
  table_name text not null,
  timestamp_column text not null default 'created_at',
  retention_period interval not null,
  is_enabled boolean not null default true,
  description text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint data_retention_policies_pkey primary key (table_name),
  constraint data_retention_policies_table_allowed_check
    check (table_name in ('audit_logs', 'security_events', 'rate_limits', 'threat_intelligence', 'backup_verifications')),
  constraint data_retention_policies_timestamp_column_check
    check (timestamp_column in ('created_at', 'window_start', 'last_request_at', 'last_seen_at', 'expires_at', 'verified_at')),
  constraint data_retention_policies_period_minimum_check check (retention_period >= interval '1 day')
);
comment on table public.data_retention_policies is 'Retention per log table, applied by apply_data_retention() (dry run by default).';

-- the default policies (a DBA's changes to them are kept on re-runs)
insert into public.data_retention_policies as d (table_name, timestamp_column, retention_period, description) values
  ('audit_logs', 'created_at', interval '7 years', 'Audit trail: seven years, the usual bookkeeping horizon; shorten only with legal sign-off.'),
  ('security_events', 'created_at', interval '1 year', 'Security events: one year.'),
  ('rate_limits', 'window_start', interval '2 days', 'Rate-limit windows: two days, enough for detect_suspicious_activity().'),
  ('threat_intelligence', 'last_seen_at', interval '180 days', 'Threat entries not seen for 180 days.'),
  ('backup_verifications', 'verified_at', interval '2 years', 'Backup verification records: two years.')
on conflict (table_name) do nothing;

-- compliance: backup verification records (written by the runbooks' preflight)
create table if not exists public.backup_verifications (
  id uuid not null default gen_random_uuid(),
  run_id text,
  backup_label text not null,
  backup_format text not null default 'custom',
  backup_sha256 text not null,
  backup_bytes bigint,
  toc_entries bigint,
  status text not null,
  details jsonb not null default '{}'::jsonb,
  verified_by text not null default current_user,
  verified_at timestamptz not null default now(),
  created_at timestamptz not null default now(),
  constraint backup_verifications_pkey primary key (id),
  constraint backup_verifications_status_check check (status in ('passed', 'failed')),
  constraint backup_verifications_sha256_format_check check (backup_sha256 ~ '^[0-9a-f]{64}$'),
  constraint backup_verifications_backup_format_check check (backup_format in ('custom', 'directory', 'tar', 'plain')),
  constraint backup_verifications_backup_bytes_nonnegative_check check (backup_bytes >= 0),
  constraint backup_verifications_toc_entries_nonnegative_check check (toc_entries >= 0)
);
comment on table public.backup_verifications is 'One row per verified backup: its sha256, size, pg_restore --list entries and verdict (never a path with secrets).';

-- row-level security: on everywhere; on these tables only this phase's deny-all policies (below), legacy ones go
do $$
declare
  r record;
begin
  for r in
    select p.polname, p.polrelid::regclass as tbl
      from pg_catalog.pg_policy p
      join pg_catalog.pg_class c on c.oid = p.polrelid
     where p.polrelid in ('public.rate_limits'::regclass, 'public.threat_intelligence'::regclass,
                          'public.data_retention_policies'::regclass, 'public.backup_verifications'::regclass)
       and p.polname <> c.relname || '_no_client_access'
     order by p.polrelid::regclass::text, p.polname
  loop
    raise notice 'legacy policy % on % dropped: only service_role and the owner use this table', quote_ident(r.polname), r.tbl;
    execute format('drop policy %I on %s', r.polname, r.tbl);
  end loop;
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
revoke all on table public.rate_limits, public.threat_intelligence, public.data_retention_policies,
  public.backup_verifications from anon, authenticated, service_role;
grant select, insert, update, delete on table public.rate_limits, public.threat_intelligence,
  public.data_retention_policies, public.backup_verifications to service_role;

-- closed to clients, said explicitly: no row for authenticated, whatever it asks (anon has no policy and
-- no grant; service_role bypasses RLS). One permissive policy per table: nothing else to combine with.
drop policy if exists rate_limits_no_client_access on public.rate_limits;
create policy rate_limits_no_client_access on public.rate_limits for all to authenticated
  using (false) with check (false);
drop policy if exists threat_intelligence_no_client_access on public.threat_intelligence;
create policy threat_intelligence_no_client_access on public.threat_intelligence for all to authenticated
  using (false) with check (false);
drop policy if exists data_retention_policies_no_client_access on public.data_retention_policies;
create policy data_retention_policies_no_client_access on public.data_retention_policies for all to authenticated
  using (false) with check (false);
drop policy if exists backup_verifications_no_client_access on public.backup_verifications;
create policy backup_verifications_no_client_access on public.backup_verifications for all to authenticated
  using (false) with check (false);

-- updated_at triggers of this phase's tables
create or replace trigger update_threat_intelligence_updated_at before update on public.threat_intelligence
  for each row execute function public.update_updated_at_column();
create or replace trigger update_data_retention_policies_updated_at before update on public.data_retention_policies
  for each row execute function public.update_updated_at_column();

-- validation: an error that names the rule
create or replace function private.rule_violation(p_rule text, p_table text, p_message text)
returns void
language plpgsql
set search_path = ''
as $$
begin
  raise exception '%: %', p_rule, p_message
    using errcode = 'check_violation', constraint = p_rule, table = p_table, schema = 'public';
end;
$$;

-- validation: inventory belongs to its product's organization
create or replace function private.validate_inventory_product()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_org uuid;
begin
  if tg_op = 'UPDATE' and new.organization_id is distinct from old.organization_id then
    return new;  -- inventory_organization_immutable_check refuses it (validate_organization_unchanged)
  end if;
  select p.organization_id into v_org from public.products as p where p.id = new.product_id;
  if new.organization_id is null then
    new.organization_id := v_org;
  elsif v_org is not null and new.organization_id <> v_org then
    perform private.rule_violation('inventory_organization_matches_product_check', tg_table_name,
      format('inventory of product %s must belong to organization %s, not %s', new.product_id, v_org, new.organization_id));
  end if;
  return new;
end;
$$;

-- validation: tenant data never moves to another organization
create or replace function private.validate_organization_unchanged()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if new.organization_id is distinct from old.organization_id then
    perform private.rule_violation(tg_table_name || '_organization_immutable_check', tg_table_name,
      format('a row of %s cannot move from organization %s to %s; create it in the other organization instead',
             tg_table_name, old.organization_id, new.organization_id));
  end if;
  return new;
end;
$$;

-- validation: a revoked key stays revoked, a key's hash never changes
create or replace function private.validate_api_key_update()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if old.revoked_at is not null and new.revoked_at is distinct from old.revoked_at then
    perform private.rule_violation('api_keys_revocation_final_check', tg_table_name,
      format('api key %s was revoked at %s and stays revoked; create a new key instead', old.id, old.revoked_at));
  end if;
  if new.key_hash is distinct from old.key_hash then
    perform private.rule_violation('api_keys_revocation_final_check', tg_table_name,
      format('the key_hash of api key %s cannot change; create a new key and revoke this one', old.id));
  end if;
  return new;
end;
$$;

-- validation (API users): a profile points at one of the user's organizations
create or replace function private.validate_profile_organization()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if current_setting('role', true) = 'authenticated' and new.organization_id is not null
     and not exists (select 1 from public.organization_members as m
                      where m.user_id = new.id and m.organization_id = new.organization_id) then
    perform private.rule_violation('profiles_organization_membership_check', tg_table_name,
      format('profile %s cannot point at organization %s: the user is not a member of it', new.id, new.organization_id));
  end if;
  return new;
end;
$$;

-- validation (API users): owners are granted and removed by owners; an organization keeps an owner
create or replace function private.validate_membership_change()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_org uuid := case when tg_op = 'DELETE' then old.organization_id else new.organization_id end;
  v_adds_owner boolean := tg_op <> 'DELETE' and new.role = 'owner' and (tg_op = 'INSERT' or old.role is distinct from 'owner');
  v_removes_owner boolean := tg_op <> 'INSERT' and old.role = 'owner' and (tg_op = 'DELETE' or new.role is distinct from 'owner');
begin
  if current_setting('role', true) is distinct from 'authenticated' then
    return case when tg_op = 'DELETE' then old else new end;
  end if;
  if (v_adds_owner or v_removes_owner)
     and not exists (select 1 from public.organization_members as m
                      where m.organization_id = v_org and m.user_id = (select auth.uid()) and m.role = 'owner') then
    perform private.rule_violation('organization_members_owner_change_check', tg_table_name,
      'only an owner of the organization grants, changes or removes the owner role');
  end if;
  if v_removes_owner
     and exists (select 1 from public.organizations as o where o.id = old.organization_id)
     and not exists (select 1 from public.organization_members as m
                      where m.organization_id = old.organization_id and m.role = 'owner' and m.id <> old.id) then
    perform private.rule_violation('organization_members_last_owner_check', tg_table_name,
      format('organization %s would be left without an owner; make someone else owner first', old.organization_id));
  end if;
  return case when tg_op = 'DELETE' then old else new end;
end;
$$;

-- the validation functions are for triggers only
revoke all on function private.rule_violation(text, text, text) from public, anon, authenticated;
revoke all on function private.validate_inventory_product() from public, anon, authenticated;
revoke all on function private.validate_organization_unchanged() from public, anon, authenticated;
revoke all on function private.validate_api_key_update() from public, anon, authenticated;
revoke all on function private.validate_profile_organization() from public, anon, authenticated;
revoke all on function private.validate_membership_change() from public, anon, authenticated;

-- the validation triggers
create or replace trigger validate_inventory_product before insert or update of organization_id, product_id on public.inventory
  for each row execute function private.validate_inventory_product();
create or replace trigger validate_organization_unchanged before update of organization_id on public.products
  for each row execute function private.validate_organization_unchanged();
create or replace trigger validate_organization_unchanged before update of organization_id on public.inventory
  for each row execute function private.validate_organization_unchanged();
create or replace trigger validate_organization_unchanged before update of organization_id on public.api_keys
  for each row execute function private.validate_organization_unchanged();
create or replace trigger validate_organization_unchanged before update of organization_id on public.organization_members
  for each row execute function private.validate_organization_unchanged();
create or replace trigger validate_api_key_update before update of revoked_at, key_hash on public.api_keys
  for each row execute function private.validate_api_key_update();
create or replace trigger validate_profile_organization before insert or update of organization_id on public.profiles
  for each row execute function private.validate_profile_organization();
create or replace trigger validate_membership_change before insert or update of role or delete on public.organization_members
  for each row execute function private.validate_membership_change();

-- audit trail: changes to the tenant data append to audit_logs
create or replace function private.audit_row_change()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_old jsonb;
  v_new jsonb;
  v_row jsonb;
  v_headers jsonb;
  v_address text;
  v_ip inet;
begin
  if tg_op <> 'INSERT' then
    v_old := pg_catalog.to_jsonb(old) - 'key_hash';
  end if;
  if tg_op <> 'DELETE' then
    v_new := pg_catalog.to_jsonb(new) - 'key_hash';
  end if;
  if tg_op = 'UPDATE' and (v_old - 'updated_at') = (v_new - 'updated_at') then
    return null;
  end if;
  v_row := coalesce(v_new, v_old);
  v_headers := nullif(current_setting('request.headers', true), '')::jsonb;
  v_address := nullif(btrim(split_part(coalesce(v_headers ->> 'x-forwarded-for', v_headers ->> 'x-real-ip', ''), ',', 1)), '');
  if v_address is not null then
    begin
      v_ip := v_address::inet;
    exception when others then
      v_ip := null;
    end;
  end if;
  insert into public.audit_logs (organization_id, user_id, action, table_name, record_id, old_data, new_data, ip_address, user_agent)
  values ((v_row ->> case when tg_table_name = 'organizations' then 'id' else 'organization_id' end)::uuid,
          (select auth.uid()), lower(tg_op), tg_table_name, (v_row ->> 'id')::uuid, v_old, v_new, v_ip,
          v_headers ->> 'user-agent');
  return null;
end;
$$;
revoke all on function private.audit_row_change() from public, anon, authenticated;

-- the audit triggers
create or replace trigger audit_row_change after insert or update or delete on public.organizations
  for each row execute function private.audit_row_change();
create or replace trigger audit_row_change after insert or update or delete on public.organization_members
  for each row execute function private.audit_row_change();
create or replace trigger audit_row_change after insert or update or delete on public.products
  for each row execute function private.audit_row_change();
create or replace trigger audit_row_change after insert or update or delete on public.inventory
  for each row execute function private.audit_row_change();
create or replace trigger audit_row_change after insert or update or delete on public.api_keys
  for each row execute function private.audit_row_change();

-- security: event logging
create or replace function public.log_security_event(
  p_event_type text, p_severity text, p_org_id uuid, p_user_id uuid, p_ip_address inet, p_details jsonb)
returns uuid
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_id uuid;
begin
  insert into public.security_events (event_type, severity, organization_id, user_id, ip_address, details)
  values (p_event_type, p_severity, p_org_id, p_user_id, p_ip_address, coalesce(p_details, '{}'::jsonb))
  returning id into v_id;
  return v_id;
end;
$$;
comment on function public.log_security_event(text, text, uuid, uuid, inet, jsonb) is
  'Appends a security_events row (severity low, medium, high or critical) and returns its id. For service_role and the DBA.';

-- security: rate limiting (true while under the limit; every call counts)
create or replace function public.check_rate_limit(p_key text, p_max_requests integer, p_window interval)
returns boolean
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_start timestamptz;
  v_count bigint;
begin
  if p_key is null or btrim(p_key) = '' then
    raise exception 'check_rate_limit: p_key must not be empty' using errcode = 'invalid_parameter_value';
  end if;
  if p_max_requests is null or p_max_requests < 1 then
    raise exception 'check_rate_limit: p_max_requests must be at least 1 (got %)', p_max_requests using errcode = 'invalid_parameter_value';
  end if;
  if p_window is null or p_window <= interval '0' or extract(month from p_window) <> 0 or extract(year from p_window) <> 0 then
    raise exception 'check_rate_limit: p_window must be a positive interval of days, hours, minutes or seconds (got %)', p_window
      using errcode = 'invalid_parameter_value';
  end if;
  v_start := date_bin(p_window, now(), timestamptz '2000-01-01 00:00:00+00');
  insert into public.rate_limits as r (key, window_start, window_length, max_requests, request_count, last_request_at)
  values (p_key, v_start, p_window, p_max_requests, 1, now())
  on conflict (key, window_start) do update
     set request_count = r.request_count + 1,
         max_requests = excluded.max_requests,
         window_length = excluded.window_length,
         last_request_at = excluded.last_request_at
  returning r.request_count into v_count;
  return v_count <= p_max_requests;
end;
$$;
comment on function public.check_rate_limit(text, integer, interval) is
  'Counts one request for p_key in the current fixed window of length p_window; true while the count is at most p_max_requests.';

-- security: suspicious-activity scoring from events, rate-limit hits and threat intelligence
create or replace function public.detect_suspicious_activity(p_org_id uuid, p_ip_address inet, p_user_id uuid)
returns table (is_suspicious boolean, risk_score integer, reasons text[])
language plpgsql
security definer
set search_path = ''
as $$
#variable_conflict use_column
declare
  v_score integer := 0;
  v_reasons text[] := '{}';
  v_threat record;
  v_serious bigint;
  v_failures bigint;
  v_addresses bigint;
  v_hits bigint;
begin
  if p_ip_address is not null then
    select t.threat_type, t.severity, t.ip_address into v_threat
      from public.threat_intelligence as t
     where p_ip_address <<= t.ip_address and (t.expires_at is null or t.expires_at > now())
     order by case t.severity when 'critical' then 4 when 'high' then 3 when 'medium' then 2 else 1 end desc, t.ip_address
     limit 1;
    if found then
      v_score := v_score + case v_threat.severity when 'critical' then 60 when 'high' then 50 when 'medium' then 30 else 15 end;
      v_reasons := v_reasons || format('address %s is listed in threat intelligence (%s, %s)', host(p_ip_address), v_threat.threat_type, v_threat.severity);
    end if;
  end if;

  select count(*) filter (where e.severity in ('high', 'critical')),
         count(*) filter (where e.event_type ~* '(fail|denied|invalid|blocked)')
    into v_serious, v_failures
    from public.security_events as e
   where e.created_at > now() - interval '1 hour'
     and e.event_type <> 'suspicious_activity'
     and ((p_ip_address is not null and e.ip_address = p_ip_address) or (p_user_id is not null and e.user_id = p_user_id))
     and (p_org_id is null or e.organization_id is null or e.organization_id = p_org_id);
  if v_serious > 0 then
    v_score := v_score + least(30, 10 * v_serious)::integer;
    v_reasons := v_reasons || format('%s high or critical security event(s) in the last hour', v_serious);
  end if;
  if v_failures >= 5 then
    v_score := v_score + 20;
    v_reasons := v_reasons || format('%s failed or denied attempts in the last hour', v_failures);
  end if;

  if p_user_id is not null then
    select count(distinct e.ip_address) into v_addresses
      from public.security_events as e
     where e.user_id = p_user_id and e.created_at > now() - interval '1 hour' and e.ip_address is not null;
    if v_addresses >= 4 then
      v_score := v_score + 15;
      v_reasons := v_reasons || format('%s different addresses for the user in the last hour', v_addresses);
    end if;
  end if;

  select count(*) into v_hits
    from public.rate_limits as r
   where r.last_request_at > now() - interval '1 hour'
     and r.request_count > r.max_requests
     and ((p_ip_address is not null and (r.key = 'ip:' || host(p_ip_address) or r.key like 'ip:' || host(p_ip_address) || '/%'))
          or (p_user_id is not null and (r.key = 'user:' || p_user_id or r.key like 'user:' || p_user_id || '/%')));
  if v_hits > 0 then
    v_score := v_score + least(30, 15 * v_hits)::integer;
    v_reasons := v_reasons || format('%s rate limit(s) exceeded in the last hour', v_hits);
  end if;

  v_score := least(v_score, 100);
  if v_score >= 50 then
    perform public.log_security_event('suspicious_activity', case when v_score >= 80 then 'critical' else 'high' end,
      p_org_id, p_user_id, p_ip_address, jsonb_build_object('risk_score', v_score, 'reasons', to_jsonb(v_reasons)));
  end if;
  return query select v_score >= 50, v_score, v_reasons;
end;
$$;
comment on function public.detect_suspicious_activity(uuid, inet, uuid) is
  'Risk score 0-100 from threat intelligence, the last hour''s security events and rate-limit hits; suspicious at 50 or more, which is logged as a security_events row.';

-- monitoring: one row per table in public
create or replace function public.get_database_stats()
returns table (table_name text, row_count bigint, total_bytes bigint, index_bytes bigint, seq_scans bigint,
               index_scans bigint, dead_rows bigint, last_vacuum timestamptz, last_analyze timestamptz)
language plpgsql
stable
security definer
set search_path = ''
as $$
#variable_conflict use_column
declare
  r record;
  v_count bigint;
begin
  for r in
    select c.oid, c.relname from pg_catalog.pg_class as c
     where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p') and not c.relispartition
     order by c.relname
  loop
    execute format('select count(*) from public.%I', r.relname) into v_count;
    return query
      select r.relname::text, v_count, pg_catalog.pg_total_relation_size(r.oid), pg_catalog.pg_indexes_size(r.oid),
             s.seq_scan, s.idx_scan, s.n_dead_tup,
             greatest(s.last_vacuum, s.last_autovacuum), greatest(s.last_analyze, s.last_autoanalyze)
        from (select 1) as one
        left join pg_catalog.pg_stat_user_tables as s on s.relid = r.oid;
  end loop;
end;
$$;
comment on function public.get_database_stats() is
  'One row per table in public: exact row count (a count(*) of each table), sizes, scans, dead rows, last (auto)vacuum and (auto)analyze.';

-- monitoring: data integrity (ok, warning: legacy rows a rule now refuses, error: something a phase should have fixed)
create or replace function public.verify_data_integrity()
returns table (check_name text, status text, affected_rows bigint, details text)
language plpgsql
stable
security definer
set search_path = ''
as $$
#variable_conflict use_column
declare
  v_count bigint;
  v_sample text;
  r record;
begin
  -- legacy rows that break a rule (each guarded for new writes): warnings
  for r in
    select x.name, x.query, x.what from (values
      ('organizations_slug_format', 'select count(*), string_agg(slug, '', '' order by slug) from public.organizations where not public.validate_org_slug(slug)', 'organization slugs that validate_org_slug() refuses'),
      ('organizations_without_owner', 'select count(*), string_agg(o.slug, '', '' order by o.slug) from public.organizations o where not exists (select 1 from public.organization_members m where m.organization_id = o.id and m.role = ''owner'')', 'organizations without an owner'),
      ('profiles_without_user', 'select count(*), string_agg(p.id::text, '', '' order by p.id) from public.profiles p where not exists (select 1 from auth.users u where u.id = p.id)', 'profiles whose auth user is gone'),
      ('members_without_user', 'select count(*), string_agg(m.user_id::text, '', '' order by m.user_id) from public.organization_members m where not exists (select 1 from auth.users u where u.id = m.user_id)', 'memberships whose auth user is gone'),
      ('members_without_organization', 'select count(*), string_agg(m.id::text, '', '' order by m.id) from public.organization_members m where not exists (select 1 from public.organizations o where o.id = m.organization_id)', 'memberships whose organization is gone'),
      ('members_invalid_role', 'select count(*), string_agg(m.role, '', '' order by m.role) from public.organization_members m where m.role not in (''owner'', ''admin'', ''member'', ''viewer'')', 'memberships with a role other than owner, admin, member, viewer'),
      ('products_sku_format', 'select count(*), string_agg(sku, '', '' order by sku) from public.products where not public.validate_sku(sku)', 'SKUs that validate_sku() refuses'),
      ('products_duplicate_sku', 'select coalesce(sum(n), 0)::bigint, string_agg(k, '', '' order by k) from (select upper(sku) as k, count(*) as n from public.products group by organization_id, upper(sku) having count(*) > 1) d', 'products whose SKU repeats within the organization, ignoring case'),
      ('products_negative_price', 'select count(*), string_agg(sku, '', '' order by sku) from public.products where price < 0', 'products with a negative price'),
      ('products_currency_format', 'select count(*), string_agg(distinct currency, '', '') from public.products where currency !~ ''^[A-Z]{3}$''', 'products whose currency is not an ISO 4217 code'),
      ('products_without_organization', 'select count(*), string_agg(p.sku, '', '' order by p.sku) from public.products p where not exists (select 1 from public.organizations o where o.id = p.organization_id)', 'products whose organization is gone'),
      ('inventory_negative_stock', 'select count(*), string_agg(id::text, '', '' order by id) from public.inventory where quantity < 0', 'inventory rows with a negative quantity'),
      ('inventory_reserved_out_of_range', 'select count(*), string_agg(id::text, '', '' order by id) from public.inventory where reserved_quantity < 0 or reserved_quantity > quantity', 'inventory rows whose reserved quantity is not between 0 and the quantity'),
      ('inventory_without_product', 'select count(*), string_agg(i.id::text, '', '' order by i.id) from public.inventory i where not exists (select 1 from public.products p where p.id = i.product_id)', 'inventory rows whose product is gone'),
      ('inventory_organization_mismatch', 'select count(*), string_agg(i.id::text, '', '' order by i.id) from public.inventory i join public.products p on p.id = i.product_id where i.organization_id is distinct from p.organization_id', 'inventory rows in another organization than their product'),
      ('api_keys_without_organization', 'select count(*), string_agg(k.name, '', '' order by k.name) from public.api_keys k where not exists (select 1 from public.organizations o where o.id = k.organization_id)', 'api keys whose organization is gone'),
      ('api_keys_key_hash_format', 'select count(*), string_agg(name, '', '' order by name) from public.api_keys where key_hash !~ ''^[0-9a-f]{64}$''', 'api keys whose key_hash is not a sha256 hex digest')
    ) as x (name, query, what)
  loop
    execute r.query into v_count, v_sample;
    return query select r.name, case when v_count = 0 then 'ok' else 'warning' end, v_count,
      case when v_count = 0 then 'none: no ' || r.what else format('%s: %s (%s)', r.what, v_count, left(v_sample, 400)) end;
  end loop;

  -- triggers on the core tables that the phases did not install (legacy ones, kept)
  select count(*), string_agg(format('%s on %s (%s)', t.tgname, t.tgrelid::regclass, t.tgfoid::regprocedure), ', '
                              order by t.tgrelid::regclass::text, t.tgname)
    into v_count, v_sample
    from pg_catalog.pg_trigger as t
    join pg_catalog.pg_proc as f on f.oid = t.tgfoid
   where not t.tgisinternal
     and t.tgrelid in ('public.organizations'::regclass, 'public.profiles'::regclass, 'public.organization_members'::regclass,
                       'public.products'::regclass, 'public.inventory'::regclass, 'public.audit_logs'::regclass,
                       'public.api_keys'::regclass, 'public.security_events'::regclass)
     and f.pronamespace <> 'private'::regnamespace
     and t.tgfoid <> 'public.update_updated_at_column()'::regprocedure;
  return query select 'legacy_triggers', case when v_count = 0 then 'ok' else 'warning' end, v_count,
    coalesce('triggers the phases did not install, kept (check they work with the contract''s columns): ' || v_sample,
             'none: the core tables carry only the contract''s triggers');

  -- every constraint not yet validated, and how many rows break it
  v_count := 0;
  v_sample := null;
  for r in
    select c.conrelid::regclass as tbl, c.conname, c.contype, pg_catalog.pg_get_expr(c.conbin, c.conrelid) as expr,
           c.confrelid::regclass as ref, c.conkey, c.confkey
      from pg_catalog.pg_constraint as c
      join pg_catalog.pg_class as t on t.oid = c.conrelid
     where t.relnamespace = 'public'::regnamespace and not c.convalidated and c.contype in ('c', 'f')
     order by c.conrelid::regclass::text, c.conname
  loop
    declare
      v_breaking bigint;
    begin
      if r.contype = 'c' then
        execute format('select count(*) from %s where not (%s)', r.tbl, r.expr) into v_breaking;
      else
        execute format('select count(*) from %1$s as t where t.%2$I is not null and not exists (select 1 from %3$s as r where r.%4$I = t.%2$I)',
                       r.tbl,
                       (select a.attname from pg_catalog.pg_attribute a where a.attrelid = r.tbl and a.attnum = r.conkey[1]),
                       r.ref,
                       (select a.attname from pg_catalog.pg_attribute a where a.attrelid = r.ref and a.attnum = r.confkey[1]))
          into v_breaking;
      end if;
      v_count := v_count + v_breaking;
      v_sample := concat_ws('; ', v_sample, format('%s (%s row(s))', r.conname, v_breaking));
    end;
  end loop;
  return query select 'constraints_not_validated', case when v_count = 0 and v_sample is null then 'ok' else 'warning' end, v_count,
    coalesce('rules added NOT VALID that legacy rows break (new writes are checked): ' || v_sample, 'none: every constraint is validated');

  -- what the phases should have fixed: errors
  select count(*), string_agg(c.relname, ', ' order by c.relname) into v_count, v_sample
    from pg_catalog.pg_class as c
   where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p') and not c.relrowsecurity;
  return query select 'rls_disabled', case when v_count = 0 then 'ok' else 'error' end, v_count,
    coalesce('tables in public without row level security: ' || v_sample, 'none: every table in public has row level security');

  select count(*), string_agg(c.relname, ', ' order by c.relname) into v_count, v_sample
    from pg_catalog.pg_class as c
    join pg_catalog.pg_attribute as a on a.attrelid = c.oid and a.attname = 'updated_at' and not a.attisdropped
   where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p') and not c.relispartition
     and not exists (select 1 from pg_catalog.pg_trigger as t
                      where t.tgrelid = c.oid and t.tgenabled <> 'D'
                        and t.tgfoid = 'public.update_updated_at_column()'::regprocedure);
  return query select 'updated_at_triggers_missing', case when v_count = 0 then 'ok' else 'error' end, v_count,
    coalesce('tables with updated_at and no enabled update_updated_at_column() trigger: ' || v_sample, 'none: every updated_at is maintained');

  select count(*), string_agg(p.table_name, ', ' order by p.table_name) into v_count, v_sample
    from (select r.table_name from private.pending_rewrites as r
          union select d.table_name from private.pending_redactions as d) as p;
  return query select 'plaintext_rewrite_pending', case when v_count = 0 then 'ok' else 'error' end, v_count,
    coalesce('tables that may still hold plaintext api keys, in copies not yet redacted or old row versions (re-run 001_core_schema.sql): '
             || v_sample, 'none: no table waits for its redaction or rewrite');

  select count(distinct b.table_name), string_agg(distinct b.table_name || '.' || b.source, ', ') into v_count, v_sample
    from private.pending_backfills as b;
  return query select 'legacy_backfill_pending', case when v_count = 0 then 'ok' else 'error' end, v_count,
    coalesce('legacy columns not yet carried into the contract''s (re-run 001_core_schema.sql): ' || v_sample,
             'none: every legacy column is carried');

  select count(*), string_agg(a.attname, ', ' order by a.attname) into v_count, v_sample
    from pg_catalog.pg_attribute as a
   where a.attrelid = 'public.api_keys'::regclass and a.attnum > 0 and not a.attisdropped
     and a.attname in ('key', 'api_key', 'secret', 'secret_key', 'token', 'plaintext_key', 'plain_key', 'raw_key', 'key_value');
  return query select 'api_keys_plaintext', case when v_count = 0 then 'ok' else 'error' end, v_count,
    coalesce('api_keys still has plaintext key column(s): ' || v_sample, 'none: api keys are stored as key_prefix and key_hash only');
end;
$$;
comment on function public.verify_data_integrity() is
  'Integrity report: ok; warning = legacy rows that break a rule (kept; every new write is checked); error = something the phases should have fixed (RLS off, updated_at unmaintained, plaintext api keys).';

-- retention: per data_retention_policies; a dry run (the default) changes nothing
create or replace function public.apply_data_retention(p_dry_run boolean default true)
returns table (table_name text, rows_affected bigint)
language plpgsql
security definer
set search_path = ''
as $$
#variable_conflict use_column
declare
  p record;
  v_count bigint;
begin
  if p_dry_run is null then
    raise exception 'apply_data_retention: p_dry_run must be true or false' using errcode = 'invalid_parameter_value';
  end if;
  for p in
    select d.table_name, d.timestamp_column, d.retention_period
      from public.data_retention_policies as d
     where d.is_enabled
     order by d.table_name
  loop
    if not exists (select 1 from pg_catalog.pg_attribute as a
                    where a.attrelid = to_regclass('public.' || quote_ident(p.table_name))
                      and a.attname = p.timestamp_column and not a.attisdropped
                      and a.atttypid in ('timestamptz'::regtype, 'timestamp'::regtype)) then
      raise warning 'apply_data_retention: public.%.% is not a timestamp column: policy skipped', p.table_name, p.timestamp_column;
      continue;
    end if;
    if p_dry_run then
      execute format('select count(*) from public.%I where %I < now() - $1', p.table_name, p.timestamp_column)
        into v_count using p.retention_period;
    else
      execute format('delete from public.%I where %I < now() - $1', p.table_name, p.timestamp_column)
        using p.retention_period;
      get diagnostics v_count = row_count;
      insert into public.audit_logs (action, table_name, user_id, new_data)
      values ('data_retention.applied', p.table_name, (select auth.uid()),
              jsonb_build_object('rows_deleted', v_count, 'retention_period', p.retention_period::text,
                                 'timestamp_column', p.timestamp_column, 'run_by', session_user));
    end if;
    return query select p.table_name, v_count;
  end loop;
end;
$$;
comment on function public.apply_data_retention(boolean) is
  'Deletes log rows older than their data_retention_policies period (true = dry run: counts only, the default). Each real run is recorded in audit_logs.';

-- compliance: personal values blanked wherever they were copied, the user id replaced by the pseudonym
create or replace function private.blank_personal(p_text text, p_personal text[])
returns text
language plpgsql
immutable
set search_path = ''
as $$
declare
  v_value text;
begin
  foreach v_value in array coalesce(p_personal, '{}') loop
    if length(v_value) >= 3 then
      p_text := pg_catalog.regexp_replace(p_text, pg_catalog.regexp_replace(v_value, '([.^$*+?()\[\]{}|\\-])', '\\\1', 'g'),
                                          '[anonymized]', 'gi');
    end if;
  end loop;
  return p_text;
end;
$$;
revoke all on function private.blank_personal(text, text[]) from public, anon, authenticated;

-- the same through a json document: personal keys blanked, the user id replaced by the pseudonym
create or replace function private.pseudonymise_jsonb(p_doc jsonb, p_user uuid, p_pseudonym uuid, p_personal text[])
returns jsonb
language sql
immutable
set search_path = ''
as $$
  select case pg_catalog.jsonb_typeof(p_doc)
    when 'object' then coalesce((
      select pg_catalog.jsonb_object_agg(e.key,
               case when e.key in ('email', 'full_name', 'display_name', 'first_name', 'last_name', 'avatar_url', 'phone',
                                   'ip', 'ip_address', 'ip_addr', 'client_ip', 'user_agent')
                         and pg_catalog.jsonb_typeof(e.value) <> 'null'
                    then pg_catalog.to_jsonb('[anonymized]'::text)
                    else private.pseudonymise_jsonb(e.value, p_user, p_pseudonym, p_personal) end)
        from pg_catalog.jsonb_each(p_doc) as e), '{}'::jsonb)
    when 'array' then coalesce((
      select pg_catalog.jsonb_agg(private.pseudonymise_jsonb(e.value, p_user, p_pseudonym, p_personal) order by e.n)
        from pg_catalog.jsonb_array_elements(p_doc) with ordinality as e (value, n)), '[]'::jsonb)
    when 'string' then pg_catalog.to_jsonb(
      case when p_doc #>> '{}' = p_user::text then p_pseudonym::text
           else private.blank_personal(p_doc #>> '{}', p_personal) end)
    else p_doc
  end
$$;
revoke all on function private.pseudonymise_jsonb(jsonb, uuid, uuid, text[]) from public, anon, authenticated;

-- compliance: everything held about one user (the body; public.export_user_data() is the entry point)
create or replace function private.export_user_data(p_user_id uuid)
returns jsonb
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  v_role constant text := current_setting('role', true);
begin
  if v_role = 'anon' or (v_role = 'authenticated' and (p_user_id is null or p_user_id is distinct from (select auth.uid()))) then
    raise exception 'export_user_data: a user may export only their own data'
      using errcode = 'insufficient_privilege';
  end if;
  if p_user_id is null then
    raise exception 'export_user_data: p_user_id is required' using errcode = 'invalid_parameter_value';
  end if;
  return jsonb_build_object(
    'user_id', p_user_id,
    'exported_at', now(),
    'account', (select jsonb_build_object('email', u.email, 'created_at', u.created_at, 'last_sign_in_at', u.last_sign_in_at,
                                          'email_confirmed_at', u.email_confirmed_at, 'user_metadata', u.raw_user_meta_data)
                  from auth.users as u where u.id = p_user_id),
    'profile', (select to_jsonb(p) from public.profiles as p where p.id = p_user_id),
    'memberships', coalesce((select jsonb_agg(jsonb_build_object('organization_id', m.organization_id, 'organization', o.name,
                                                                  'role', m.role, 'since', m.created_at) order by m.created_at, m.organization_id)
                               from public.organization_members as m
                               left join public.organizations as o on o.id = m.organization_id
                              where m.user_id = p_user_id), '[]'::jsonb),
    'api_keys_created', coalesce((select jsonb_agg(to_jsonb(k) - 'key_hash' order by k.created_at, k.id)
                                    from public.api_keys as k where k.created_by = p_user_id), '[]'::jsonb),
    'audit_logs', coalesce((select jsonb_agg(to_jsonb(a) order by a.created_at, a.id)
                              from public.audit_logs as a
                             where a.user_id = p_user_id or a.record_id = p_user_id
                                or strpos(coalesce(a.old_data::text, '') || coalesce(a.new_data::text, ''), p_user_id::text) > 0),
                           '[]'::jsonb),
    'security_events', coalesce((select jsonb_agg(to_jsonb(e) order by e.created_at, e.id)
                                   from public.security_events as e where e.user_id = p_user_id), '[]'::jsonb));
end;
$$;
revoke all on function private.export_user_data(uuid) from public, anon;
grant execute on function private.export_user_data(uuid) to authenticated, service_role;

-- compliance: the client entry point of export_user_data (SECURITY INVOKER; checks the caller, then the body)
create or replace function public.export_user_data(p_user_id uuid)
returns jsonb
language plpgsql
stable
security invoker
set search_path = ''
as $$
begin
  if current_user = 'anon'
     or (current_user = 'authenticated' and (p_user_id is null or p_user_id is distinct from (select auth.uid()))) then
    raise exception 'export_user_data: a user may export only their own data'
      using errcode = 'insufficient_privilege';
  end if;
  return private.export_user_data(p_user_id);
end;
$$;
comment on function public.export_user_data(uuid) is
  'GDPR access: everything held about one user as jsonb. authenticated: their own data only; service_role and the DBA: anyone; anon: nothing.';

-- compliance: an erasure update that a legacy rule-breaker cannot block
create or replace function private.erase_update(p_table regclass, p_sets text, p_where text)
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  c record;
  v_blocking boolean;
  v_names text[] := '{}';
  v_definitions text[] := '{}';
  v_count bigint;
begin
  -- a NOT VALID rule that a target row breaks would refuse the whole update: it steps aside for it
  for c in
    select con.conname, pg_catalog.pg_get_constraintdef(con.oid) as definition,
           pg_catalog.pg_get_expr(con.conbin, con.conrelid) as expression
      from pg_catalog.pg_constraint as con
     where con.conrelid = p_table and con.contype = 'c' and not con.convalidated
     order by con.conname
  loop
    execute format('select exists (select 1 from %s where (%s) and not (%s))', p_table, p_where, c.expression) into v_blocking;
    if v_blocking then
      execute format('alter table %s drop constraint %I', p_table, c.conname);
      v_names := v_names || c.conname::text;
      v_definitions := v_definitions || c.definition;
    end if;
  end loop;
  execute format('update %s set %s where %s', p_table, p_sets, p_where);
  get diagnostics v_count = row_count;
  for i in 1 .. coalesce(array_length(v_names, 1), 0) loop
    execute format('alter table %s add constraint %I %s', p_table, v_names[i], v_definitions[i]);
    raise notice '%: rows that break % were erased as well; the rule is back as it was (NOT VALID), the rows stay reported',
      p_table, v_names[i];
  end loop;
  return v_count;
end;
$$;
revoke all on function private.erase_update(regclass, text, text) from public, anon, authenticated;

-- compliance: erasure; audit rows and security events stay, pseudonymised
create or replace function public.anonymize_user(p_user_id uuid)
returns void
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_pseudonym constant uuid := gen_random_uuid();
  v_email constant text := format('anonymized-%s@anonymized.invalid', replace(v_pseudonym::text, '-', ''));
  v_user text;
  v_alias text;
  v_personal text;
  v_known boolean;
  v_col text;
  v_sets text;
  v_where text;
  v_table text;
begin
  if p_user_id is null then
    raise exception 'anonymize_user: p_user_id is required' using errcode = 'invalid_parameter_value';
  end if;
  select exists (select 1 from auth.users as u where u.id = p_user_id)
      or exists (select 1 from public.profiles as p where p.id = p_user_id)
      or exists (select 1 from public.organization_members as m where m.user_id = p_user_id)
      or exists (select 1 from public.audit_logs as a where a.user_id = p_user_id)
      or exists (select 1 from public.security_events as e where e.user_id = p_user_id)
    into v_known;
  if not v_known then
    raise exception 'anonymize_user: nothing is held about user %', p_user_id using errcode = 'no_data_found';
  end if;
  v_user := quote_literal(p_user_id::text) || '::uuid';
  v_alias := quote_literal(v_pseudonym::text) || '::uuid';
  -- the values that identify the person, to blank wherever they were copied
  select quote_literal(coalesce(array_agg(distinct v) filter (where v is not null and length(v) >= 3), '{}')::text) || '::text[]'
    into v_personal
    from (select p.email as v from public.profiles as p where p.id = p_user_id
          union all select p.full_name from public.profiles as p where p.id = p_user_id
          union all select u.email from auth.users as u where u.id = p_user_id
          union all select u.raw_user_meta_data ->> 'full_name' from auth.users as u where u.id = p_user_id) as s;

  -- memberships end (audited, then pseudonymised with the rest below)
  delete from public.organization_members as m where m.user_id = p_user_id;
  -- the profile stays without personal data (every other column of it that may hold some is cleared)
  v_sets := format('email = %L', v_email);
  for v_col in
    select a.attname from pg_catalog.pg_attribute as a
     where a.attrelid = 'public.profiles'::regclass and a.attnum > 0 and not a.attisdropped and not a.attnotnull
       and a.attname not in ('id', 'organization_id', 'email', 'created_at', 'updated_at')
     order by a.attnum
  loop
    v_sets := v_sets || format(', %I = null', v_col);
  end loop;
  perform private.erase_update('public.profiles', v_sets, format('id = %s', v_user));
  -- the account: e-mail and metadata replaced (deleting it is Supabase Auth's job)
  update auth.users as u set email = v_email, raw_user_meta_data = '{}'::jsonb where u.id = p_user_id;
  perform private.erase_update('public.api_keys', 'created_by = null', format('created_by = %s', v_user));

  -- audit rows and security events stay, pseudonymised
  foreach v_table in array array['audit_logs', 'security_events'] loop
    v_sets := format('user_id = case when user_id = %1$s then %2$s else user_id end', v_user, v_alias);
    v_where := format('user_id = %s', v_user);
    if v_table = 'audit_logs' then
      v_sets := v_sets || format(', record_id = case when record_id = %1$s then %2$s else record_id end', v_user, v_alias)
                       || format(', user_agent = case when user_id = %s then null else user_agent end', v_user);
      v_where := v_where || format(' or record_id = %s', v_user);
    end if;
    v_sets := v_sets || format(', ip_address = case when user_id = %s then null else ip_address end', v_user);
    for v_col in
      select a.attname from pg_catalog.pg_attribute as a
       where a.attrelid = ('public.' || v_table)::regclass and a.attnum > 0 and not a.attisdropped and a.atttypid = 'jsonb'::regtype
       order by a.attnum
    loop
      v_sets := v_sets || format(', %1$I = private.pseudonymise_jsonb(%1$I, %2$s, %3$s, %4$s)', v_col, v_user, v_alias, v_personal);
      v_where := v_where || format(' or strpos(%1$I::text, %2$L) > 0 or exists (select 1 from unnest(%3$s) as s where strpos(%1$I::text, s) > 0)',
                                   v_col, p_user_id::text, v_personal);
    end loop;
    perform private.erase_update(('public.' || v_table)::regclass, v_sets, v_where);
  end loop;

  insert into public.audit_logs (action, table_name, record_id, user_id, new_data)
  values ('user.anonymized', 'auth.users', v_pseudonym, (select auth.uid()),
          jsonb_build_object('pseudonym', v_pseudonym, 'run_by', session_user));
end;
$$;
comment on function public.anonymize_user(uuid) is
  'GDPR erasure: memberships end, the profile and auth account lose their personal data, audit rows and security events stay under a random pseudonym. For service_role and the DBA.';

-- permissions: the functions of this phase are for service_role and the owner; export_user_data also for authenticated
revoke all on function public.log_security_event(text, text, uuid, uuid, inet, jsonb) from public, anon, authenticated;
revoke all on function public.check_rate_limit(text, integer, interval) from public, anon, authenticated;
revoke all on function public.detect_suspicious_activity(uuid, inet, uuid) from public, anon, authenticated;
revoke all on function public.get_database_stats() from public, anon, authenticated;
revoke all on function public.verify_data_integrity() from public, anon, authenticated;
revoke all on function public.apply_data_retention(boolean) from public, anon, authenticated;
revoke all on function public.anonymize_user(uuid) from public, anon, authenticated;
revoke all on function public.export_user_data(uuid) from public, anon;
grant execute on function public.log_security_event(text, text, uuid, uuid, inet, jsonb) to service_role;
grant execute on function public.check_rate_limit(text, integer, interval) to service_role;
grant execute on function public.detect_suspicious_activity(uuid, inet, uuid) to service_role;
grant execute on function public.get_database_stats() to service_role;
grant execute on function public.verify_data_integrity() to service_role;
grant execute on function public.apply_data_retention(boolean) to service_role;
grant execute on function public.anonymize_user(uuid) to service_role;
grant execute on function public.export_user_data(uuid) to authenticated, service_role;

-- indexes (tables created empty above, or already in this shape)
-- runbook: no-transaction
create index concurrently if not exists rate_limits_last_request_at_idx on public.rate_limits (last_request_at);
-- runbook: no-transaction
create index concurrently if not exists rate_limits_window_start_idx on public.rate_limits (window_start);
-- runbook: no-transaction
create index concurrently if not exists threat_intelligence_ip_address_idx on public.threat_intelligence using gist (ip_address inet_ops);
-- runbook: no-transaction
create index concurrently if not exists threat_intelligence_last_seen_at_idx on public.threat_intelligence (last_seen_at);
-- runbook: no-transaction
create index concurrently if not exists backup_verifications_verified_at_idx on public.backup_verifications (verified_at);
