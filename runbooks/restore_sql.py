"""The SQL of a rollback (`restore`): the catalog reads its checks run, and the script it wraps
around pg_restore's output -- text only: nothing here connects or runs anything.

- reading the target: `OUTSIDE_SQL` (what dropping the managed schemas would take along elsewhere),
  `FOREIGN_OWNERS_SQL`, `PUBLICATIONS_SQL`, `EXTENSION_OWNERS_SQL`, `ARCHIVE_EXTENSIONS_SQL`, and
  `acts_for` (may the connecting role act for a role), which they share;
- the script: `prelude` (BEGIN, the default privileges reset, the drops, a created ``public``) and
  `postlude` (the history check, the rollback's history row, COMMIT);
- pg_restore's own output: `extension_schemas` reads where it creates extensions, and
  `as_extension_owner` wraps its CREATE EXTENSION lines in the owner's ``SET ROLE``.
"""

from __future__ import annotations

import re

from . import engine

DEFAULT_PUBLIC_INIT_PRIVS = ["=U/pg_database_owner"]   # initdb's, besides the owner's own
# pg_restore's line that creates an extension: (name, schema), quoted as SQL identifiers.
EXTENSION_SQL = re.compile(r'^CREATE EXTENSION IF NOT EXISTS ("(?:[^"]|"")+"|\S+) WITH SCHEMA ("(?:[^"]|"")+"|\S+);',
                           re.MULTILINE)
CREATE_EXTENSION = re.compile(rb'^CREATE EXTENSION IF NOT EXISTS ("(?:[^"]|"")+"|\S+) WITH SCHEMA ')


class UnsafeValue(ValueError):
    """A value that cannot be written into the script as an SQL literal."""


# -- identifiers and literals ------------------------------------------------------------------------

def unquote(ident: str) -> str:
    """An identifier as SQL quotes it (``"My Schema"``), as its name."""
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def quote_ident(name: str) -> str:
    """A name as an SQL identifier, quoted only when it must be (as pg_dump writes them)."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def literal(value) -> str:
    """A value as an SQL string literal (standard_conforming_strings on: the default since PostgreSQL 9.1)."""
    text = str(value)
    if "\x00" in text:
        raise UnsafeValue("a value for the restore script contains a NUL character")
    return "'" + text.replace("'", "''") + "'"


def text_array(values) -> str:
    """Values as an SQL text[] expression."""
    return "ARRAY[" + ", ".join(literal(v) for v in values) + "]::text[]"


def acts_for(role: str) -> str:
    """SQL: may the connecting role act for `role` (an SQL expression: name or oid)? It needs the
    role's privileges (to drop what it owns) and, from PostgreSQL 16, SET ROLE to it (ALTER ...
    OWNER TO and ALTER DEFAULT PRIVILEGES FOR ROLE ask for that; 15 asks for membership)."""
    return (f"(case when pg_catalog.current_setting('server_version_num')::int >= 160000 "
            f"then pg_catalog.pg_has_role(current_user, {role}, 'USAGE') "
            f"and pg_catalog.pg_has_role(current_user, {role}, 'SET') "
            f"else pg_catalog.pg_has_role(current_user, {role}, 'USAGE') end)")


# -- reading the target ------------------------------------------------------------------------------

# What depends on the managed schemas %(schemas)s, and lives outside them (dropping them takes it along).
OUTSIDE_SQL = """
with recursive managed as (
  select oid from pg_namespace where nspname = any(%(schemas)s)
), closure(classid, objid, objsubid) as (
  select 'pg_namespace'::regclass::oid, oid, 0 from managed
  union
  select x.classid, x.objid, x.objsubid
  from closure c cross join lateral (
    -- what depends on it goes with it ...
    select d.classid, d.objid, d.objsubid from pg_depend d
    where d.refclassid = c.classid and d.refobjid = c.objid and (c.objsubid = 0 or d.refobjsubid = c.objsubid)
      and d.deptype in ('n', 'a', 'e', 'x', 'i', 'P', 'S')
    union all
    -- ... and what it is an internal part of (a view's rewrite rule takes the view)
    select d.refclassid, d.refobjid, d.refobjsubid from pg_depend d
    where d.classid = c.classid and d.objid = c.objid and d.objsubid = c.objsubid and d.deptype = 'i'
  ) x
), placed as (
  select c.*, case c.classid
      when 'pg_namespace'::regclass then c.objid
      when 'pg_class'::regclass then (select relnamespace from pg_class where oid = c.objid)
      when 'pg_type'::regclass then (select typnamespace from pg_type where oid = c.objid)
      when 'pg_proc'::regclass then (select pronamespace from pg_proc where oid = c.objid)
      when 'pg_constraint'::regclass then (select connamespace from pg_constraint where oid = c.objid)
      when 'pg_trigger'::regclass then (select r.relnamespace from pg_trigger t join pg_class r on r.oid = t.tgrelid where t.oid = c.objid)
      when 'pg_policy'::regclass then (select r.relnamespace from pg_policy p join pg_class r on r.oid = p.polrelid where p.oid = c.objid)
      when 'pg_rewrite'::regclass then (select r.relnamespace from pg_rewrite w join pg_class r on r.oid = w.ev_class where w.oid = c.objid)
      when 'pg_attrdef'::regclass then (select r.relnamespace from pg_attrdef a join pg_class r on r.oid = a.adrelid where a.oid = c.objid)
      when 'pg_default_acl'::regclass then (select nullif(defaclnamespace, 0) from pg_default_acl where oid = c.objid)
      when 'pg_extension'::regclass then (select extnamespace from pg_extension where oid = c.objid)
      when 'pg_amop'::regclass then (select f.opfnamespace from pg_amop a join pg_opfamily f on f.oid = a.amopfamily where a.oid = c.objid)
      when 'pg_amproc'::regclass then (select f.opfnamespace from pg_amproc a join pg_opfamily f on f.oid = a.amprocfamily where a.oid = c.objid)
      when 'pg_opclass'::regclass then (select opcnamespace from pg_opclass where oid = c.objid)
      when 'pg_opfamily'::regclass then (select opfnamespace from pg_opfamily where oid = c.objid)
      when 'pg_operator'::regclass then (select oprnamespace from pg_operator where oid = c.objid)
      when 'pg_collation'::regclass then (select collnamespace from pg_collation where oid = c.objid)
      when 'pg_conversion'::regclass then (select connamespace from pg_conversion where oid = c.objid)
      when 'pg_statistic_ext'::regclass then (select stxnamespace from pg_statistic_ext where oid = c.objid)
      when 'pg_ts_config'::regclass then (select cfgnamespace from pg_ts_config where oid = c.objid)
      when 'pg_ts_dict'::regclass then (select dictnamespace from pg_ts_dict where oid = c.objid)
      when 'pg_ts_parser'::regclass then (select prsnamespace from pg_ts_parser where oid = c.objid)
      when 'pg_ts_template'::regclass then (select tmplnamespace from pg_ts_template where oid = c.objid)
      when 'pg_publication_rel'::regclass then (select r.relnamespace from pg_publication_rel p join pg_class r on r.oid = p.prrelid where p.oid = c.objid)
      when 'pg_publication_namespace'::regclass then (select pnnspid from pg_publication_namespace where oid = c.objid)
    end as home
  from closure c
)
select p.classid::regclass::text, i.type, i.identity, n.nspname,
       -- a member of an extension that lives in a managed schema is re-created with it
       exists (select 1 from pg_depend e join pg_extension x on x.oid = e.refobjid
               where e.classid = p.classid and e.objid = p.objid and e.deptype in ('e', 'x')
                 and e.refclassid = 'pg_extension'::regclass and x.extnamespace in (select oid from managed)),
       t.tgisinternal, tr.relname, t.tgname, po.polname, pr.relname, co.contype, cr.relname, co.conname,
       ic.relname, (select ir.relname from pg_index ix join pg_class ir on ir.oid = ix.indrelid where ix.indexrelid = ic.oid),
       p.objsubid,
       -- an internal part of another object (a view's rewrite rule, a multirange's cast) follows it
       exists (select 1 from pg_depend d where d.classid = p.classid and d.objid = p.objid
               and d.objsubid = p.objsubid and d.deptype = 'i')
from placed p
cross join lateral pg_identify_object(p.classid, p.objid, p.objsubid) i
left join pg_namespace n on n.oid = p.home
left join pg_trigger t on p.classid = 'pg_trigger'::regclass and t.oid = p.objid
left join pg_class tr on tr.oid = t.tgrelid
left join pg_policy po on p.classid = 'pg_policy'::regclass and po.oid = p.objid
left join pg_class pr on pr.oid = po.polrelid
left join pg_constraint co on p.classid = 'pg_constraint'::regclass and co.oid = p.objid
left join pg_class cr on cr.oid = co.conrelid
left join pg_class ic on p.classid = 'pg_class'::regclass and ic.oid = p.objid and ic.relkind in ('i', 'I') and p.objsubid = 0
where p.home is null or p.home not in (select oid from managed)
"""


# Every object that lives in the schemas {namespaces} (an SQL oid[] expression) and is not part of
# another object (array and row types, identity sequences, range constructors; a composite type is
# its pg_type row, its pg_class row is part of it) or of an extension:
# (classid, objid, owner, drop_order). Relations go first; what CASCADE takes along is gone by the
# time its turn comes. Text search parsers and templates have no owner: a superuser's (10).
OBJECTS_IN_SCHEMAS = """
select o.classid, o.objid, o.owner, o.drop_order from (
  select 'pg_catalog.pg_class'::pg_catalog.regclass::oid as classid, c.oid as objid, c.relowner as owner,
         case c.relkind when 'S' then 2 else 1 end as drop_order
    from pg_catalog.pg_class c where c.relnamespace = any ({namespaces}) and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')
  union all select 'pg_catalog.pg_type'::pg_catalog.regclass::oid, t.oid, t.typowner, 3
    from pg_catalog.pg_type t where t.typnamespace = any ({namespaces})
     and (t.typrelid = 0 or t.typtype = 'c' and (select r.relkind from pg_catalog.pg_class r where r.oid = t.typrelid) = 'c')
  union all select 'pg_catalog.pg_proc'::pg_catalog.regclass::oid, p.oid, p.proowner, 4
    from pg_catalog.pg_proc p where p.pronamespace = any ({namespaces})
  union all select 'pg_catalog.pg_operator'::pg_catalog.regclass::oid, o.oid, o.oprowner, 5
    from pg_catalog.pg_operator o where o.oprnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_opfamily'::pg_catalog.regclass::oid, f.oid, f.opfowner, 6
    from pg_catalog.pg_opfamily f where f.opfnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_opclass'::pg_catalog.regclass::oid, c.oid, c.opcowner, 6
    from pg_catalog.pg_opclass c where c.opcnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_statistic_ext'::pg_catalog.regclass::oid, s.oid, s.stxowner, 7
    from pg_catalog.pg_statistic_ext s where s.stxnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_collation'::pg_catalog.regclass::oid, c.oid, c.collowner, 7
    from pg_catalog.pg_collation c where c.collnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_conversion'::pg_catalog.regclass::oid, c.oid, c.conowner, 7
    from pg_catalog.pg_conversion c where c.connamespace = any ({namespaces})
  union all select 'pg_catalog.pg_ts_config'::pg_catalog.regclass::oid, c.oid, c.cfgowner, 7
    from pg_catalog.pg_ts_config c where c.cfgnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_ts_dict'::pg_catalog.regclass::oid, d.oid, d.dictowner, 8
    from pg_catalog.pg_ts_dict d where d.dictnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_ts_parser'::pg_catalog.regclass::oid, p.oid, 10::oid, 9
    from pg_catalog.pg_ts_parser p where p.prsnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_ts_template'::pg_catalog.regclass::oid, t.oid, 10::oid, 9
    from pg_catalog.pg_ts_template t where t.tmplnamespace = any ({namespaces})
) o
where not exists (select 1 from pg_catalog.pg_depend d
                  where d.classid = o.classid and d.objid = o.objid and d.objsubid = 0 and d.deptype in ('e', 'i'))
"""


def objects_in(namespaces: str) -> str:
    return OBJECTS_IN_SCHEMAS.replace("{namespaces}", namespaces)


# Objects in the schemas %(schemas)s owned by roles the connecting role cannot act for: (owner, how
# many, three of them).
FOREIGN_OWNERS_SQL = f"""with app as (
  select ARRAY(select n.oid from pg_catalog.pg_namespace n where n.nspname = any (%(schemas)s::text[])) as oids
)
select pg_catalog.pg_get_userbyid(o.owner), pg_catalog.count(*),
       (pg_catalog.array_agg(ident.type || ' ' || ident.identity order by ident.type, ident.identity))[1:3]
from ({objects_in("(select app.oids from app)::oid[]")}) o
cross join lateral pg_catalog.pg_identify_object(o.classid, o.objid, 0) ident
where not {acts_for('o.owner')}
group by 1 order by 1"""


# Tables (and schemas) of the managed schemas in a publication (Supabase's supabase_realtime): a rollback
# drops them, which takes them out of it, and pg_restore's ALTER PUBLICATION ... ADD puts them back, which
# only the publication's owner may do.
PUBLICATIONS_SQL = f"""
select 'table ' || r.oid::regclass::text, p.pubname::text, pg_catalog.pg_get_userbyid(p.pubowner)
from pg_catalog.pg_publication_rel pr
join pg_catalog.pg_publication p on p.oid = pr.prpubid
join pg_catalog.pg_class r on r.oid = pr.prrelid
join pg_catalog.pg_namespace n on n.oid = r.relnamespace
where n.nspname = any (%(schemas)s::text[]) and not {acts_for('p.pubowner')}
union all
select 'schema ' || pg_catalog.quote_ident(n.nspname), p.pubname::text, pg_catalog.pg_get_userbyid(p.pubowner)
from pg_catalog.pg_publication_namespace pn
join pg_catalog.pg_publication p on p.oid = pn.pnpubid
join pg_catalog.pg_namespace n on n.oid = pn.pnnspid
where n.nspname = any (%(schemas)s::text[]) and not {acts_for('p.pubowner')}
order by 1, 2"""


# An extension is re-created by its owner (SET ROLE around CREATE EXTENSION): created by another
# role, its members get another owner and their grants another grantor, and the proof fails. A
# superuser may SET ROLE to anyone, another role only to roles it may act for. The owner itself must
# be able to create it: a superuser, or the extension needs none (its control file's superuser =
# false), or it is trusted (PostgreSQL 13+: pg_available_extension_versions.trusted) and the owner
# has CREATE on the database. Judged on the version a re-creation installs: pg_dump's CREATE EXTENSION
# names none, so the server's default one.
EXTENSION_OWNERS_SQL = f"""
select x.extname, pg_catalog.pg_get_userbyid(x.extowner), n.nspname,
       r.rolsuper
       or (coalesce(not v.superuser or v.trusted, false)
           and (not coalesce(v.superuser, true)
                or pg_catalog.has_database_privilege(x.extowner, pg_catalog.current_database(), 'CREATE'))) as may_create,
       x.extowner = (select oid from pg_catalog.pg_roles where rolname = current_user) as mine,
       {acts_for('x.extowner')} as acts,
       coalesce(not v.superuser or v.trusted, false) as trusted
from pg_catalog.pg_extension x
join pg_catalog.pg_namespace n on n.oid = x.extnamespace
join pg_catalog.pg_roles r on r.oid = x.extowner
left join pg_catalog.pg_available_extensions a on a.name = x.extname
left join pg_catalog.pg_available_extension_versions v on v.name = a.name and v.version = a.default_version
where n.nspname = any (%s::text[])
order by 1"""
# What the connecting role would need to create the extensions only the archive has (as itself).
ARCHIVE_EXTENSIONS_SQL = """
select x.extname, coalesce(not v.superuser or v.trusted, false) as trusted,
       coalesce(not v.superuser, false) or pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')
from unnest(%s::text[]) as x(extname)
left join pg_catalog.pg_available_extensions a on a.name = x.extname
left join pg_catalog.pg_available_extension_versions v on v.name = a.name and v.version = a.default_version
order by 1"""


# -- the script ----------------------------------------------------------------------------------------

def prelude(*, database: str, file_name: str, sha: str, run_id: str, lock_timeout: str, reset_roles: list[str],
            kept: list[str], dropped: list[str], create_public: bool, public_init: list[str] | None) -> str:
    """What the script does before pg_restore's output: BEGIN, the default privileges of `reset_roles`
    back to the built-in ones, the `dropped` schemas dropped, the `kept` ones emptied, and ``public``
    created as initdb leaves it when the archive has to create it."""
    lines = [f"-- TruthSource rollback of database {database} to {file_name} (sha256 {sha}), run {run_id}",
             "-- one transaction, committed by the script's last line only: input cut short is rolled back",
             "BEGIN;",
             f"SET lock_timeout = {literal(lock_timeout)};",
             "SELECT pg_catalog.set_config('truthsource.rollback_started', pg_catalog.clock_timestamp()::text, false);",
             reset_default_privileges_sql(reset_roles, kept)]
    if dropped:
        lines.append("-- schemas the backup does not have (or whose own owner, comment or privileges changed): "
                     "dropped with everything in them")
        lines.append("DROP SCHEMA IF EXISTS " + ", ".join(quote_ident(s) for s in dropped) + " CASCADE;")
    if kept:
        lines.append(empty_schemas_sql(kept))
    if create_public:
        lines.append("-- initdb creates public, so pg_dump never does: create it as initdb leaves it")
        lines += public_baseline(public_init)
    return "\n".join(lines) + "\n"


def postlude(*, history_rows: list[dict], history_exists: bool, file_name: str, sha: str, operator: str,
             run_id: str, restored_to: str, entries: int, schemas: list[str]) -> str:
    """What the script does after pg_restore's output: every history row read before is still there
    (or the history table is created), the rollback's own history row, COMMIT."""
    lines = ["", "-- the deployment history: every row read before the restore is still there, plus this rollback"]
    if history_exists:
        ids = sorted(r["id"] for r in history_rows)
        lines.append(f"""DO $history_check$
BEGIN
  IF (SELECT pg_catalog.count(*) FROM {engine.HISTORY_TABLE} WHERE id = ANY ('{{{",".join(map(str, ids))}}}'::bigint[])) <> {len(ids)} THEN
    RAISE EXCEPTION 'deployment history rows went missing during the rollback: aborting it';
  END IF;
END
$history_check$;""")
    else:
        lines.append(engine.HISTORY_DDL.strip())
    note = (f"restored {file_name} into schema(s) {', '.join(schemas)} ({entries} archive entries); "
            f"{len(history_rows)} history rows kept")
    lines.append(
        f"INSERT INTO {engine.HISTORY_TABLE} (version, file_name, sha256, action, applied_by, duration_ms, "
        f"statements, run_id, restored_to, note)\nVALUES ('rollback', {literal(file_name)}, {literal(sha)}, "
        f"'rollback', {literal(operator)}, (extract(epoch FROM pg_catalog.clock_timestamp() - "
        f"pg_catalog.current_setting('truthsource.rollback_started')::timestamptz) * 1000)::bigint, {entries}, "
        f"{literal(run_id)}, {literal(restored_to)}::timestamptz, {literal(note)});")
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def public_baseline(init_privs: list[str] | None) -> list[str]:
    """`public` as initdb leaves it; the archive's entries then say what differs."""
    sql = ["CREATE SCHEMA public;",
           "ALTER SCHEMA public OWNER TO pg_database_owner;",
           "COMMENT ON SCHEMA public IS 'standard public schema';"]
    for item in (DEFAULT_PUBLIC_INIT_PRIVS if init_privs is None else init_privs):
        grantee, _, rest = item.partition("=")
        privileges, _, _grantor = rest.partition("/")
        if grantee == "pg_database_owner":
            continue   # the owner's own privileges are implicit
        names = {"U": "USAGE", "C": "CREATE"}
        for letter in privileges.replace("*", ""):
            grant_option = f"{letter}*" in privileges
            sql.append(f"GRANT {names[letter]} ON SCHEMA public TO {grantee or 'PUBLIC'}"
                       + (" WITH GRANT OPTION;" if grant_option else ";"))
    return sql


def reset_default_privileges_sql(roles: list[str], kept: list[str]) -> str:
    """The default privileges of `roles`, global and in the kept schemas, back to the built-in ones."""
    return f"""-- objects get the default privileges of the role that creates them, and the connecting role
-- creates every object here: reset its default privileges (global, and in the kept schemas) to the
-- built-in ones, so each object starts with the privileges pg_dump's GRANTs are relative to; the
-- archive's DEFAULT ACL entries of these roles come last and put theirs back
DO $reset_default_privileges$
DECLARE
  d record;
  grantee text;
  objects text;
  scope text;
BEGIN
  FOR d IN SELECT a.defaclrole, a.defaclnamespace, a.defaclobjtype, a.defaclacl, n.nspname
           FROM pg_catalog.pg_default_acl a LEFT JOIN pg_catalog.pg_namespace n ON n.oid = a.defaclnamespace
           WHERE pg_catalog.pg_get_userbyid(a.defaclrole) = ANY ({text_array(roles)})
             AND (a.defaclnamespace = 0 OR n.nspname = ANY ({text_array(kept)}))
           ORDER BY 1, 2, 3 LOOP
    objects := CASE d.defaclobjtype WHEN 'r' THEN 'TABLES' WHEN 'S' THEN 'SEQUENCES' WHEN 'f' THEN 'FUNCTIONS'
                                    WHEN 'T' THEN 'TYPES' WHEN 'n' THEN 'SCHEMAS' WHEN 'L' THEN 'LARGE OBJECTS' END;
    scope := CASE WHEN d.defaclnamespace = 0 THEN '' ELSE pg_catalog.format(' IN SCHEMA %I', d.nspname) END;
    FOR grantee IN SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END
                   FROM pg_catalog.aclexplode(d.defaclacl) a LOOP
      EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I%s REVOKE ALL ON %s FROM %s',
                                pg_catalog.pg_get_userbyid(d.defaclrole), scope, objects, grantee);
    END LOOP;
    IF d.defaclnamespace = 0 THEN
      -- a global entry replaces the built-in default: the owner's and PUBLIC's privileges come back
      EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT ALL ON %s TO %I',
                                pg_catalog.pg_get_userbyid(d.defaclrole), objects, pg_catalog.pg_get_userbyid(d.defaclrole));
      IF objects = 'FUNCTIONS' THEN
        EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT EXECUTE ON FUNCTIONS TO PUBLIC', pg_catalog.pg_get_userbyid(d.defaclrole));
      ELSIF objects = 'TYPES' THEN
        EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT USAGE ON TYPES TO PUBLIC', pg_catalog.pg_get_userbyid(d.defaclrole));
      END IF;
    END IF;
  END LOOP;
END
$reset_default_privileges$;"""


def empty_schemas_sql(kept: list[str]) -> str:
    """Drop everything in the kept schemas, keeping the schemas themselves."""
    objects = objects_in("kept")
    return f"""-- the kept schemas stay (owner, comment, privileges, other roles' default privileges); what is in
-- them goes, whoever created it: their extensions (members and all), then every other object
DO $empty_kept_schemas$
DECLARE
  kept oid[] := ARRAY(SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = ANY ({text_array(kept)}));
  extensions text[];
  drops text[];
  classes oid[];
  objs oid[];
  present boolean;
  leftover text;
BEGIN
  extensions := ARRAY(SELECT x.extname FROM pg_catalog.pg_extension x WHERE x.extnamespace = ANY (kept) ORDER BY 1);
  FOR k IN 1 .. coalesce(pg_catalog.array_length(extensions, 1), 0) LOOP
    EXECUTE pg_catalog.format('DROP EXTENSION %I CASCADE', extensions[k]);
  END LOOP;
  SELECT pg_catalog.array_agg(pg_catalog.format('DROP %s %s CASCADE',
                                                CASE ident.type WHEN 'statistics object' THEN 'STATISTICS'
                                                                ELSE pg_catalog.upper(ident.type) END,
                                                ident.identity) ORDER BY o.drop_order, ident.identity),
         pg_catalog.array_agg(o.classid ORDER BY o.drop_order, ident.identity),
         pg_catalog.array_agg(o.objid ORDER BY o.drop_order, ident.identity)
    INTO drops, classes, objs
    FROM ({objects}) o CROSS JOIN LATERAL pg_catalog.pg_identify_object(o.classid, o.objid, 0) ident;
  FOR k IN 1 .. coalesce(pg_catalog.array_length(drops, 1), 0) LOOP
    -- gone already when CASCADE took it along with something dropped before
    EXECUTE pg_catalog.format('SELECT EXISTS (SELECT 1 FROM %s WHERE oid = $1)', classes[k]::pg_catalog.regclass)
      INTO present USING objs[k];
    IF present THEN
      EXECUTE drops[k];
    END IF;
  END LOOP;
  SELECT pg_catalog.string_agg(ident.type || ' ' || ident.identity, ', ' ORDER BY ident.identity) INTO leftover
    FROM ({objects}) o CROSS JOIN LATERAL pg_catalog.pg_identify_object(o.classid, o.objid, 0) ident;
  IF leftover IS NOT NULL THEN
    RAISE EXCEPTION 'emptying the kept schemas left objects behind: %', leftover;
  END IF;
END
$empty_kept_schemas$;"""


# -- pg_restore's output ------------------------------------------------------------------------------

def extension_schemas(script: str) -> dict[str, str]:
    """{extension: schema} as pg_restore's script creates them (its listing does not say)."""
    return {unquote(m.group(1)): unquote(m.group(2)) for m in EXTENSION_SQL.finditer(script)}


def as_extension_owner(line: bytes, owners: dict[str, str]) -> bytes:
    """pg_restore's CREATE EXTENSION line, run as the extension's owner when another role owns it."""
    match = CREATE_EXTENSION.match(line) if owners else None
    owner = match and owners.get(unquote(match.group(1).decode()))
    if not owner:
        return line
    return (f"SET ROLE {quote_ident(owner)};\n".encode() + line.rstrip(b"\n") + b"\nRESET ROLE;\n")
