-- legacy_fixture.sql: the audited legacy state of TruthSource production, with data
--
-- Deploys: schema app; the legacy functions, tables, triggers, policies, indexes and rows
--          listed below (deterministic: fixed uuids, fixed timestamps, fixed keys).
-- Requires: sql/support/supabase_shim.sql (or a real auth schema), on a database where none
--           of the product's objects exist yet. Not a phase and not idempotent: it is loaded
--           once into a throwaway database (runbooks.fixtures.load_legacy_fixture, in one
--           transaction) for rehearsals and tests. Never apply it to a real database.
--
-- What each oddity reproduces (the guide's audit, and what the phases must converge):
--  1. Several updated-at trigger functions under different names, each with triggers:
--     public.update_updated_at() (organizations, and inventory where it also fires on
--     INSERT), public.handle_updated_at() (profiles, api_keys), public.set_updated_at()
--     (organization_members; stamps timezone('utc', now())), app.update_updated_at_column()
--     (the canonical name, in another schema: products), and public.update_updated_at_column()
--     itself in another shape (SECURITY DEFINER, mutable search_path, CURRENT_TIMESTAMP),
--     which profiles calls through a second, duplicate trigger.
--  2. Helper overloads that clash with the contract's signatures, each used by a legacy
--     policy: is_org_member(org uuid) (one argument, reads auth.uid() inside),
--     is_org_admin(text, text) (wins over (uuid, uuid) for untyped literals such as the
--     guide's `select is_org_admin('user-uuid', 'org-uuid')`), get_user_organization_id()
--     (no argument). All SECURITY DEFINER without a pinned search_path.
--  3. Tables defined more than once in different shapes:
--     audit_logs was first written as entity_type/entity_id/changes/ip (text), and a later
--     migration added table_name/record_id/new_data, so rows use one shape, the other, or
--     both; id is a bigserial with no primary key; entity_id holds a non-uuid ('legacy-42');
--     ip holds values that are not inet ('unknown', an X-Forwarded-For list); changes is
--     sometimes {"old": ..., "new": ...} and sometimes the new values alone.
--     api_keys keeps the plaintext key (column "key", unique), permissions jsonb instead of
--     scopes, is_active instead of revoked_at, last_used instead of last_used_at, and a
--     later key_hash column that newer code filled for some keys (one without plaintext).
--     One plaintext key was also copied into an audit_logs row (changes->>'key').
--  4. Inconsistent RLS: an open policy with a telltale name (organizations "Enable read
--     access for all users" using (true)) and one with an innocent name (products
--     "products_tenant_isolation": FOR ALL using (true) with check (true)); auth.uid()
--     called unwrapped; organization_members and audit_logs without RLS at all.
--  5. Missing and duplicate indexes: no index on products.organization_id,
--     inventory.product_id, inventory.organization_id, organization_members.user_id,
--     api_keys.organization_id or profiles.organization_id (all foreign keys or join keys);
--     idx_organizations_slug duplicates the unique constraint's index on organizations.slug.
--  6. Rows that break the new rules (kept unchanged by the phases, and reported):
--     organization slug 'Initech_Legacy'; product SKU 'wid-001' (lowercase, and a
--     case-insensitive duplicate of 'WID-001' in the same organization); a product price of
--     -5.00; inventory quantity -3; inventory reserved 10 > quantity 4; a member (heidi) and
--     her profile whose auth user is gone; a member role 'editor' that is no contract role.
--  7. Smaller drift: products has no currency and price numeric(10,2); no unique
--     (organization_id, sku) but a plain index on sku; organization_members.user_id has no
--     foreign key (which is how heidi's membership outlived her user); legacy checks that the
--     contract's rules replace: organization_members_role_check (the contract's name, saying only
--     role <> '') and products_name_length.
--
-- The people (uuid 0b000000-...-00000000000N):
--   1 alice  owner of acme and of initech    5 erin   owner of globex
--   2 bob    admin of acme                   6 frank  admin of globex, 'editor' of initech
--   3 carol  member of acme                  7 grace  member of globex
--   4 dave   viewer of acme                  8 heidi  member of acme; auth user deleted
-- The plaintext keys (api_keys.key) are the strings 'ts_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0',
-- 'ts_live_0123456789abcdef0123456789abcdef' and 'ts_test_a1b2c3d4e5f60718293a4b5c6d7e8f90'.

-- the legacy updated-at functions
create function public.update_updated_at() returns trigger
language plpgsql
as $$
begin
  NEW.updated_at = NOW();
  RETURN NEW;
end;
$$;

create function public.handle_updated_at() returns trigger
language plpgsql
as $$
BEGIN
  -- keep updated_at current
  new.updated_at := now();
  RETURN new;
END
$$;

create function public.set_updated_at() returns trigger
language plpgsql
as $$
begin
  new.updated_at = timezone('utc'::text, now());
  return new;
end;
$$;

create function public.update_updated_at_column() returns trigger
language plpgsql
security definer
as $$
begin
  NEW.updated_at = CURRENT_TIMESTAMP;
  return NEW;
end;
$$;

create schema app;

create function app.update_updated_at_column() returns trigger
language plpgsql
as $$
begin
  new.updated_at = now();
  return new;
end;
$$;

-- the legacy tables
create table public.organizations (
  id uuid primary key default gen_random_uuid(),
  name text not null,
  slug text unique,
  settings jsonb default '{}'::jsonb,
  created_at timestamptz default now(),
  updated_at timestamptz default now()
);
create index idx_organizations_slug on public.organizations (slug);

create table public.profiles (
  id uuid primary key,
  email text,
  full_name text,
  avatar_url text,
  organization_id uuid references public.organizations (id),
  created_at timestamptz default now(),
  updated_at timestamptz default now()
);

create table public.organization_members (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid not null references public.organizations (id) on delete cascade,
  user_id uuid not null,
  role text not null default 'member',
  created_at timestamptz default now(),
  updated_at timestamptz default now(),
  unique (organization_id, user_id),
  constraint organization_members_role_check check (role <> '')
);

create table public.products (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid not null references public.organizations (id),
  sku text not null,
  name text not null,
  description text,
  price numeric(10, 2) not null default 0,
  created_at timestamptz default now(),
  updated_at timestamptz default now(),
  constraint products_name_length check (char_length(name) <= 200)
);
create index idx_products_sku on public.products (sku);

create table public.inventory (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid references public.organizations (id),
  product_id uuid not null references public.products (id) on delete cascade,
  location text not null default 'main',
  quantity integer not null default 0,
  reserved_quantity integer not null default 0,
  created_at timestamptz default now(),
  updated_at timestamptz default now(),
  unique (product_id, location)
);

create table public.audit_logs (
  id bigserial,
  organization_id uuid,
  user_id uuid,
  action text not null,
  entity_type text,
  entity_id text,
  changes jsonb,
  ip text,
  user_agent text,
  created_at timestamptz default now()
);
-- a later migration's shape, added beside the first one
alter table public.audit_logs add column table_name text;
alter table public.audit_logs add column record_id uuid;
alter table public.audit_logs add column new_data jsonb;

create table public.api_keys (
  id uuid primary key default gen_random_uuid(),
  organization_id uuid references public.organizations (id),
  name text not null,
  key text unique,
  permissions jsonb default '["read"]'::jsonb,
  created_by uuid,
  last_used timestamptz,
  expires_at timestamptz,
  is_active boolean default true,
  created_at timestamptz default now(),
  updated_at timestamptz default now()
);
-- a later migration's column, filled by newer code only
alter table public.api_keys add column key_hash text;

-- the legacy triggers
create trigger update_organizations_updated_at before update on public.organizations
  for each row execute function public.update_updated_at();
create trigger handle_profiles_updated_at before update on public.profiles
  for each row execute function public.handle_updated_at();
create trigger on_profile_updated before update on public.profiles
  for each row execute function public.update_updated_at_column();
create trigger set_organization_members_updated_at before update on public.organization_members
  for each row execute function public.set_updated_at();
create trigger products_updated_at before update on public.products
  for each row execute function app.update_updated_at_column();
create trigger update_inventory_updated_at before insert or update on public.inventory
  for each row execute function public.update_updated_at();
create trigger api_keys_updated_at before update on public.api_keys
  for each row execute function public.handle_updated_at();

-- the legacy helper overloads (security definer, no pinned search_path)
create function public.is_org_member(org uuid) returns boolean
language sql stable security definer
as $$
  select exists (
    select 1 from public.organization_members
    where organization_id = org and user_id = auth.uid()
  )
$$;

create function public.is_org_admin(user_id text, org_id text) returns boolean
language sql stable security definer
as $$
  select exists (
    select 1 from public.organization_members m
    where m.user_id = $1::uuid and m.organization_id = $2::uuid and m.role in ('owner', 'admin')
  )
$$;

create function public.get_user_organization_id() returns uuid
language sql stable security definer
as $$
  select organization_id from public.profiles where id = auth.uid()
$$;

-- the legacy row-level security
alter table public.organizations enable row level security;
create policy "Enable read access for all users" on public.organizations
  for select using (true);
create policy org_update on public.organizations
  for update using (id = get_user_organization_id());

alter table public.profiles enable row level security;
create policy "Users can view own profile" on public.profiles
  for select using (auth.uid() = id);
create policy "Users can update own profile" on public.profiles
  for update using (auth.uid() = id);

alter table public.products enable row level security;
create policy "Members can view products" on public.products
  for select to authenticated using (is_org_member(organization_id));
create policy products_tenant_isolation on public.products
  for all using (true) with check (true);

alter table public.inventory enable row level security;
create policy inventory_admin_write on public.inventory
  for all to authenticated
  using (is_org_admin(auth.uid()::text, organization_id::text));

alter table public.api_keys enable row level security;
create policy "api keys visible to members" on public.api_keys
  for select using (
    organization_id in (select organization_id from public.organization_members where user_id = auth.uid())
  );

-- the data: people
insert into auth.users (id, aud, role, email, email_confirmed_at, raw_user_meta_data, created_at, updated_at) values
  ('0b000000-0000-4000-8000-000000000001', 'authenticated', 'authenticated', 'alice@acme.test', '2023-01-02 09:00:00+00', '{"full_name": "Alice Archer"}', '2023-01-02 09:00:00+00', '2023-01-02 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000002', 'authenticated', 'authenticated', 'bob@acme.test', '2023-01-03 09:00:00+00', '{"full_name": "Bob Baker"}', '2023-01-03 09:00:00+00', '2023-01-03 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000003', 'authenticated', 'authenticated', 'carol@acme.test', '2023-01-04 09:00:00+00', '{"full_name": "Carol Chen"}', '2023-01-04 09:00:00+00', '2023-01-04 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000004', 'authenticated', 'authenticated', 'dave@acme.test', '2023-01-05 09:00:00+00', '{"full_name": "Dave Diaz"}', '2023-01-05 09:00:00+00', '2023-01-05 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000005', 'authenticated', 'authenticated', 'erin@globex.test', '2023-02-01 09:00:00+00', '{"full_name": "Erin Evans"}', '2023-02-01 09:00:00+00', '2023-02-01 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000006', 'authenticated', 'authenticated', 'frank@globex.test', '2023-02-02 09:00:00+00', '{"full_name": "Frank Ford"}', '2023-02-02 09:00:00+00', '2023-02-02 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000007', 'authenticated', 'authenticated', 'grace@globex.test', '2023-02-03 09:00:00+00', '{"full_name": "Grace Green"}', '2023-02-03 09:00:00+00', '2023-02-03 09:00:00+00');
-- heidi (0b000000-0000-4000-8000-000000000008) was deleted from auth.users in 2024

insert into public.organizations (id, name, slug, settings, created_at, updated_at) values
  ('0a000000-0000-4000-8000-000000000001', 'Acme Corporation', 'acme', '{"timezone": "Europe/Berlin"}', '2023-01-02 09:05:00+00', '2024-03-01 10:00:00+00'),
  ('0a000000-0000-4000-8000-000000000002', 'Globex', 'globex', '{}', '2023-02-01 09:05:00+00', '2023-02-01 09:05:00+00'),
  ('0a000000-0000-4000-8000-000000000003', 'Initech (legacy)', 'Initech_Legacy', '{"plan": "legacy"}', '2022-06-01 08:00:00+00', '2022-06-01 08:00:00+00');

insert into public.profiles (id, email, full_name, avatar_url, organization_id, created_at, updated_at) values
  ('0b000000-0000-4000-8000-000000000001', 'alice@acme.test', 'Alice Archer', 'https://cdn.example.test/a.png', '0a000000-0000-4000-8000-000000000001', '2023-01-02 09:00:00+00', '2023-01-02 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000002', 'bob@acme.test', 'Bob Baker', null, '0a000000-0000-4000-8000-000000000001', '2023-01-03 09:00:00+00', '2023-01-03 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000003', 'carol@acme.test', 'Carol Chen', null, '0a000000-0000-4000-8000-000000000001', '2023-01-04 09:00:00+00', '2023-01-04 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000004', 'dave@acme.test', 'Dave Diaz', null, '0a000000-0000-4000-8000-000000000001', '2023-01-05 09:00:00+00', '2023-01-05 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000005', 'erin@globex.test', 'Erin Evans', null, '0a000000-0000-4000-8000-000000000002', '2023-02-01 09:00:00+00', '2023-02-01 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000006', 'frank@globex.test', 'Frank Ford', null, '0a000000-0000-4000-8000-000000000002', '2023-02-02 09:00:00+00', '2023-02-02 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000007', 'grace@globex.test', 'Grace Green', null, null, '2023-02-03 09:00:00+00', '2023-02-03 09:00:00+00'),
  ('0b000000-0000-4000-8000-000000000008', 'heidi@acme.test', 'Heidi Hall', null, '0a000000-0000-4000-8000-000000000001', '2023-01-06 09:00:00+00', '2023-01-06 09:00:00+00');

insert into public.organization_members (id, organization_id, user_id, role, created_at, updated_at) values
  ('0f000000-0000-4000-8000-000000000001', '0a000000-0000-4000-8000-000000000001', '0b000000-0000-4000-8000-000000000001', 'owner', '2023-01-02 09:05:00+00', '2023-01-02 09:05:00+00'),
  ('0f000000-0000-4000-8000-000000000002', '0a000000-0000-4000-8000-000000000001', '0b000000-0000-4000-8000-000000000002', 'admin', '2023-01-03 09:05:00+00', '2023-01-03 09:05:00+00'),
  ('0f000000-0000-4000-8000-000000000003', '0a000000-0000-4000-8000-000000000001', '0b000000-0000-4000-8000-000000000003', 'member', '2023-01-04 09:05:00+00', '2023-01-04 09:05:00+00'),
  ('0f000000-0000-4000-8000-000000000004', '0a000000-0000-4000-8000-000000000001', '0b000000-0000-4000-8000-000000000004', 'viewer', '2023-01-05 09:05:00+00', '2023-01-05 09:05:00+00'),
  ('0f000000-0000-4000-8000-000000000005', '0a000000-0000-4000-8000-000000000001', '0b000000-0000-4000-8000-000000000008', 'member', '2023-01-06 09:05:00+00', '2023-01-06 09:05:00+00'),
  ('0f000000-0000-4000-8000-000000000006', '0a000000-0000-4000-8000-000000000002', '0b000000-0000-4000-8000-000000000005', 'owner', '2023-02-01 09:05:00+00', '2023-02-01 09:05:00+00'),
  ('0f000000-0000-4000-8000-000000000007', '0a000000-0000-4000-8000-000000000002', '0b000000-0000-4000-8000-000000000006', 'admin', '2023-02-02 09:05:00+00', '2023-02-02 09:05:00+00'),
  ('0f000000-0000-4000-8000-000000000008', '0a000000-0000-4000-8000-000000000002', '0b000000-0000-4000-8000-000000000007', 'member', '2023-02-03 09:05:00+00', '2023-02-03 09:05:00+00'),
  ('0f000000-0000-4000-8000-000000000009', '0a000000-0000-4000-8000-000000000003', '0b000000-0000-4000-8000-000000000001', 'owner', '2022-06-01 08:00:00+00', '2022-06-01 08:00:00+00'),
  ('0f000000-0000-4000-8000-00000000000a', '0a000000-0000-4000-8000-000000000003', '0b000000-0000-4000-8000-000000000006', 'editor', '2022-06-02 08:00:00+00', '2022-06-02 08:00:00+00');

-- the data: catalogue and stock
insert into public.products (id, organization_id, sku, name, description, price, created_at, updated_at) values
  ('0c000000-0000-4000-8000-000000000001', '0a000000-0000-4000-8000-000000000001', 'WID-001', 'Widget', 'The classic widget', 19.99, '2023-01-10 10:00:00+00', '2023-06-01 10:00:00+00'),
  ('0c000000-0000-4000-8000-000000000002', '0a000000-0000-4000-8000-000000000001', 'wid-001', 'Widget (old import)', 'Imported from the 2022 spreadsheet', 17.50, '2022-12-20 10:00:00+00', '2022-12-20 10:00:00+00'),
  ('0c000000-0000-4000-8000-000000000003', '0a000000-0000-4000-8000-000000000001', 'GAD-100', 'Gadget', null, 149.00, '2023-01-11 10:00:00+00', '2023-01-11 10:00:00+00'),
  ('0c000000-0000-4000-8000-000000000004', '0a000000-0000-4000-8000-000000000001', 'REFUND-ADJ', 'Refund adjustment', 'Used as a credit line', -5.00, '2023-03-01 10:00:00+00', '2023-03-01 10:00:00+00'),
  ('0c000000-0000-4000-8000-000000000005', '0a000000-0000-4000-8000-000000000002', 'GLX-SPROCKET', 'Sprocket', null, 3.25, '2023-02-05 10:00:00+00', '2023-02-05 10:00:00+00'),
  ('0c000000-0000-4000-8000-000000000006', '0a000000-0000-4000-8000-000000000002', 'GLX-COG-12', 'Cog, 12 teeth', null, 0.80, '2023-02-05 10:00:00+00', '2023-02-05 10:00:00+00'),
  ('0c000000-0000-4000-8000-000000000007', '0a000000-0000-4000-8000-000000000003', 'TPS-REPORT', 'TPS report cover sheet', null, 0.10, '2022-06-03 08:00:00+00', '2022-06-03 08:00:00+00');

insert into public.inventory (id, organization_id, product_id, location, quantity, reserved_quantity, created_at, updated_at) values
  ('0d000000-0000-4000-8000-000000000001', '0a000000-0000-4000-8000-000000000001', '0c000000-0000-4000-8000-000000000001', 'main', 120, 20, '2023-01-10 10:00:00+00', '2024-02-01 10:00:00+00'),
  ('0d000000-0000-4000-8000-000000000002', '0a000000-0000-4000-8000-000000000001', '0c000000-0000-4000-8000-000000000001', 'backup', 15, 0, '2023-01-10 10:00:00+00', '2023-01-10 10:00:00+00'),
  ('0d000000-0000-4000-8000-000000000003', '0a000000-0000-4000-8000-000000000001', '0c000000-0000-4000-8000-000000000002', 'main', -3, 0, '2022-12-20 10:00:00+00', '2023-04-01 10:00:00+00'),
  ('0d000000-0000-4000-8000-000000000004', '0a000000-0000-4000-8000-000000000001', '0c000000-0000-4000-8000-000000000003', 'main', 4, 10, '2023-01-11 10:00:00+00', '2023-05-01 10:00:00+00'),
  ('0d000000-0000-4000-8000-000000000005', '0a000000-0000-4000-8000-000000000002', '0c000000-0000-4000-8000-000000000005', 'main', 5000, 250, '2023-02-05 10:00:00+00', '2023-02-05 10:00:00+00'),
  ('0d000000-0000-4000-8000-000000000006', '0a000000-0000-4000-8000-000000000002', '0c000000-0000-4000-8000-000000000006', 'dock-2', 800, 0, '2023-02-05 10:00:00+00', '2023-02-05 10:00:00+00'),
  ('0d000000-0000-4000-8000-000000000007', '0a000000-0000-4000-8000-000000000003', '0c000000-0000-4000-8000-000000000007', 'main', 10000, 0, '2022-06-03 08:00:00+00', '2022-06-03 08:00:00+00');

-- the data: api keys (plaintext in "key"; newer code also wrote key_hash)
insert into public.api_keys (id, organization_id, name, key, permissions, created_by, last_used, expires_at, is_active, created_at, updated_at, key_hash) values
  ('0e000000-0000-4000-8000-000000000001', '0a000000-0000-4000-8000-000000000001', 'CI deploy', 'ts_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0', '["read", "write"]', '0b000000-0000-4000-8000-000000000002', '2024-01-10 12:00:00+00', null, true, '2023-03-01 09:00:00+00', '2023-03-01 09:00:00+00', null),
  ('0e000000-0000-4000-8000-000000000002', '0a000000-0000-4000-8000-000000000001', 'Old integration', 'ts_live_0123456789abcdef0123456789abcdef', '["read"]', '0b000000-0000-4000-8000-000000000001', '2023-09-30 12:00:00+00', null, false, '2023-01-15 09:00:00+00', '2023-11-01 09:00:00+00', null),
  ('0e000000-0000-4000-8000-000000000003', '0a000000-0000-4000-8000-000000000002', 'Reporting', 'ts_test_a1b2c3d4e5f60718293a4b5c6d7e8f90', '["read"]', '0b000000-0000-4000-8000-000000000005', null, '2025-12-31 23:59:59+00', true, '2023-08-01 09:00:00+00', '2023-08-01 09:00:00+00',
   encode(sha256(convert_to('ts_test_a1b2c3d4e5f60718293a4b5c6d7e8f90', 'UTF8')), 'hex')),
  ('0e000000-0000-4000-8000-000000000004', '0a000000-0000-4000-8000-000000000002', 'Webhook signer', null, '["webhooks"]', '0b000000-0000-4000-8000-000000000006', null, null, true, '2024-02-01 09:00:00+00', '2024-02-01 09:00:00+00',
   'b7e4c1d3a5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90');

-- the data: audit trail, in both shapes
insert into public.audit_logs (id, organization_id, user_id, action, entity_type, entity_id, changes, ip, user_agent, created_at, table_name, record_id, new_data) values
  (1, '0a000000-0000-4000-8000-000000000001', '0b000000-0000-4000-8000-000000000002', 'create', 'product', '0c000000-0000-4000-8000-000000000001',
   '{"new": {"sku": "WID-001", "name": "Widget", "price": 17.50}}', '203.0.113.7', 'Mozilla/5.0', '2023-01-10 10:00:00+00', null, null, null),
  (2, '0a000000-0000-4000-8000-000000000001', '0b000000-0000-4000-8000-000000000002', 'update', 'product', '0c000000-0000-4000-8000-000000000001',
   '{"old": {"price": 17.50}, "new": {"price": 19.99}}', '203.0.113.7', 'Mozilla/5.0', '2023-06-01 10:00:00+00', null, null, null),
  (3, '0a000000-0000-4000-8000-000000000001', '0b000000-0000-4000-8000-000000000001', 'stock_adjustment', 'inventory', 'legacy-42',
   '{"quantity": 12}', 'unknown', 'curl/7.68.0', '2022-12-31 23:00:00+00', null, null, null),
  (4, '0a000000-0000-4000-8000-000000000001', '0b000000-0000-4000-8000-000000000001', 'update', 'organization', '0a000000-0000-4000-8000-000000000001',
   '{"settings": {"timezone": "Europe/Berlin"}}', '10.0.0.1, 10.0.0.2', 'Mozilla/5.0', '2024-03-01 10:00:00+00', 'organizations', '0a000000-0000-4000-8000-000000000001', null),
  (5, '0a000000-0000-4000-8000-000000000002', '0b000000-0000-4000-8000-000000000005', 'update', null, null,
   null, null, 'Mozilla/5.0', '2024-02-15 08:30:00+00', 'products', '0c000000-0000-4000-8000-000000000005', '{"price": 3.25}'),
  (6, '0a000000-0000-4000-8000-000000000001', '0b000000-0000-4000-8000-000000000002', 'api_key.created', 'api_key', '0e000000-0000-4000-8000-000000000001',
   '{"name": "CI deploy", "key": "ts_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0"}', '198.51.100.23', 'Mozilla/5.0', '2023-03-01 09:00:00+00', null, null, null),
  (7, null, null, 'login_failed', null, null,
   '{"email": "mallory@example.test"}', '192.0.2.66', 'python-requests/2.31', '2024-04-01 03:00:00+00', null, null, null);
alter sequence public.audit_logs_id_seq restart with 8;
