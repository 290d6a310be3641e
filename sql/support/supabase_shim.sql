-- supabase_shim.sql: the parts of Supabase the phases rely on, for a plain PostgreSQL
--
-- Deploys: roles anon, authenticated, service_role (BYPASSRLS) and authenticator; schema
--          auth with auth.users, auth.uid(), auth.role(), auth.jwt(), auth.email() reading
--          the request.jwt.claims setting as PostgREST sets it; the privileges Supabase grants
--          on public (everything to the API roles, so that RLS is the only barrier).
-- Requires: PostgreSQL 15+, a superuser (roles are created); a database WITHOUT an auth schema.
-- Never for a real Supabase project: it refuses to run where an auth schema exists, and the
-- runbooks skip it there.

-- refuse a database that already has auth (a real Supabase project, or a shimmed one)
do $$
begin
  if exists (select 1 from pg_namespace where nspname = 'auth') then
    raise exception 'supabase_shim: schema auth already exists in database %; the shim is only for plain PostgreSQL', current_database()
      using errcode = 'duplicate_schema';
  end if;
end
$$;

-- API roles (cluster-wide, so created only when missing)
do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticator') then
    create role authenticator nologin noinherit;
  end if;
end
$$;

grant anon, authenticated, service_role to authenticator;

-- schema auth and its users table (the columns the product reads)
create schema auth;

create table auth.users (
  instance_id uuid,
  id uuid primary key,
  aud varchar(255),
  role varchar(255),
  email varchar(255),
  encrypted_password varchar(255),
  email_confirmed_at timestamptz,
  last_sign_in_at timestamptz,
  raw_app_meta_data jsonb,
  raw_user_meta_data jsonb,
  is_anonymous boolean not null default false,
  created_at timestamptz default now(),
  updated_at timestamptz default now(),
  deleted_at timestamptz
);

-- request claims, read as PostgREST sets them (request.jwt.claims, or the older per-claim settings)
create function auth.jwt() returns jsonb
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

create function auth.uid() returns uuid
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create function auth.role() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

create function auth.email() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.email', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
  )::text
$$;

-- privileges on auth: the API roles may call the claim functions, not read users
grant usage on schema auth to anon, authenticated, service_role;
grant execute on function auth.jwt(), auth.uid(), auth.role(), auth.email()
  to anon, authenticated, service_role;
grant all on auth.users to service_role;

-- privileges on public, as Supabase grants them: RLS is the only barrier
grant usage on schema public to anon, authenticated, service_role;
grant all on all tables in schema public to anon, authenticated, service_role;
grant all on all functions in schema public to anon, authenticated, service_role;
grant all on all sequences in schema public to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;
