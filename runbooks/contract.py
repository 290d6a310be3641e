"""The contract (../shared/contract.md) as the code reads it: every name the modules share, named once.

A change to the contract is one edit here plus the SQL it describes; tests/test_contract.py checks
the catalog after a deployment against what this module says.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Function(NamedTuple):
    """A contract function in public, spelled as the catalog spells it."""

    name: str
    arguments: str   # as pg_get_function_arguments() spells them (defaults included)
    result: str      # as pg_get_function_result() spells it

    @property
    def identity_arguments(self) -> str:
        """As pg_get_function_identity_arguments() spells them: without defaults."""
        return re.sub(r" DEFAULT [^,]+", "", self.arguments)

    @property
    def argument_types(self) -> str:
        """'user_uuid uuid, org_uuid uuid' -> 'uuid, uuid' (as oidvectortypes() spells them)."""
        return ", ".join(part.strip().split(" ", 1)[1] for part in self.identity_arguments.split(",") if part.strip())

    @property
    def signature(self) -> str:
        """public.name(type,type): as regprocedure spells it without spaces (for privilege checks)."""
        return f"public.{self.name}({self.argument_types.replace(', ', ',')})"


FUNCTIONS = (
    Function("update_updated_at_column", "", "trigger"),
    Function("get_user_organization_id", "user_uuid uuid", "uuid"),
    Function("is_org_member", "user_uuid uuid, org_uuid uuid", "boolean"),
    Function("is_org_admin", "user_uuid uuid, org_uuid uuid", "boolean"),
    Function("validate_sku", "sku text", "boolean"),
    Function("validate_org_slug", "slug text", "boolean"),
    Function("verify_data_integrity", "", "TABLE(check_name text, status text, affected_rows bigint, details text)"),
    Function("get_database_stats", "", "TABLE(table_name text, row_count bigint, total_bytes bigint, index_bytes "
             "bigint, seq_scans bigint, index_scans bigint, dead_rows bigint, last_vacuum timestamp with time zone, "
             "last_analyze timestamp with time zone)"),
    Function("detect_suspicious_activity", "p_org_id uuid, p_ip_address inet, p_user_id uuid",
             "TABLE(is_suspicious boolean, risk_score integer, reasons text[])"),
    Function("log_security_event", "p_event_type text, p_severity text, p_org_id uuid, p_user_id uuid, "
             "p_ip_address inet, p_details jsonb", "uuid"),
    Function("check_rate_limit", "p_key text, p_max_requests integer, p_window interval", "boolean"),
    Function("apply_data_retention", "p_dry_run boolean DEFAULT true", "TABLE(table_name text, rows_affected bigint)"),
    Function("export_user_data", "p_user_id uuid", "jsonb"),
    Function("anonymize_user", "p_user_id uuid", "void"),
)
FUNCTIONS_BY_NAME = {f.name: f for f in FUNCTIONS}
# Functions clients (authenticated) may call; anon calls none of the contract's.
CLIENT_FUNCTION_NAMES = ("export_user_data", "validate_sku", "validate_org_slug")
API_ROLES = ("anon", "authenticated", "service_role")

# The contract's tables as phases 2 and 3 shape them: column -> the types accepted.
_TSTZ = ("timestamp with time zone",)
_UUID = ("uuid",)
_TEXT = ("text",)
CORE_TABLE_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "organizations": {"id": _UUID, "name": _TEXT, "slug": _TEXT, "settings": ("jsonb",),
                      "created_at": _TSTZ, "updated_at": _TSTZ},
    "profiles": {"id": _UUID, "email": _TEXT, "full_name": _TEXT, "organization_id": _UUID,
                 "created_at": _TSTZ, "updated_at": _TSTZ},
    "organization_members": {"organization_id": _UUID, "user_id": _UUID, "role": _TEXT,
                             "created_at": _TSTZ, "updated_at": _TSTZ},
    "products": {"id": _UUID, "organization_id": _UUID, "sku": _TEXT, "name": _TEXT,
                 "price": ("numeric(12,2)",), "currency": _TEXT, "created_at": _TSTZ, "updated_at": _TSTZ},
    "inventory": {"id": _UUID, "organization_id": _UUID, "product_id": _UUID, "location": _TEXT,
                  "quantity": ("integer", "bigint"), "reserved_quantity": ("integer", "bigint"),
                  "updated_at": _TSTZ},
    # the logs' ids: uuid when created by phase 2, a legacy bigint id is kept (nothing references it)
    "audit_logs": {"id": ("uuid", "bigint"), "organization_id": _UUID, "user_id": _UUID, "action": _TEXT,
                   "table_name": _TEXT, "record_id": _UUID, "old_data": ("jsonb",), "new_data": ("jsonb",),
                   "ip_address": ("inet",), "user_agent": _TEXT, "created_at": _TSTZ},
    "api_keys": {"id": _UUID, "organization_id": _UUID, "name": _TEXT, "key_prefix": _TEXT, "key_hash": _TEXT,
                 "scopes": ("text[]",), "created_by": _UUID, "last_used_at": _TSTZ, "expires_at": _TSTZ,
                 "revoked_at": _TSTZ, "created_at": _TSTZ, "updated_at": _TSTZ},
    "security_events": {"id": ("uuid", "bigint"), "organization_id": _UUID, "user_id": _UUID, "event_type": _TEXT,
                        "severity": _TEXT, "ip_address": ("inet",), "details": ("jsonb",), "created_at": _TSTZ},
}
PHASE3_TABLE_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "rate_limits": {"key": _TEXT, "window_start": _TSTZ, "window_length": ("interval",),
                    "max_requests": ("bigint",), "request_count": ("bigint",), "last_request_at": _TSTZ},
    "threat_intelligence": {"id": _UUID, "ip_address": ("inet",), "threat_type": _TEXT, "severity": _TEXT,
                            "first_seen_at": _TSTZ, "last_seen_at": _TSTZ, "expires_at": _TSTZ},
    "data_retention_policies": {"table_name": _TEXT, "timestamp_column": _TEXT, "retention_period": ("interval",),
                                "is_enabled": ("boolean",)},
    "backup_verifications": {"id": _UUID, "run_id": _TEXT, "backup_label": _TEXT, "backup_sha256": _TEXT,
                             "status": _TEXT, "details": ("jsonb",), "verified_at": _TSTZ},
}
# Phase 2's tables, parents before children: also the order in which phase 2 takes their locks.
CORE_TABLES = tuple(CORE_TABLE_COLUMNS)
PHASE3_TABLES = tuple(PHASE3_TABLE_COLUMNS)
TABLES = CORE_TABLES + PHASE3_TABLES

# Legacy api_keys columns that hold a plaintext key (phase 2 hashes, redacts and drops them).
PLAINTEXT_KEY_COLUMNS = ("key", "api_key", "secret", "secret_key", "token", "plaintext_key", "plain_key", "raw_key",
                         "key_value")

# The deployment history's schema: the runbooks' own, kept by a rollback.
HISTORY_SCHEMA = "truthsource"
# Supabase's platform schemas: never the deployment's to change, snapshot or restore.
PLATFORM_SCHEMAS = (
    "auth", "storage", "realtime", "_realtime", "extensions", "graphql", "graphql_public", "vault", "pgsodium",
    "pgsodium_masks", "supabase_functions", "supabase_migrations", "net", "_analytics", "pgbouncer", "cron",
    "pgtle",
)


PLATFORM_SCHEMAS_SQL = "array[" + ", ".join(f"'{s}'" for s in PLATFORM_SCHEMAS) + "]"


def is_app_schema(name: str) -> bool:
    """A schema the product owns: not PostgreSQL's, not the runbooks' history, not Supabase's platform."""
    return not (name in ("pg_catalog", "information_schema") or name.startswith("pg_") or name == HISTORY_SCHEMA
                or name in PLATFORM_SCHEMAS)


def app_schema_condition(column: str = "n.nspname") -> str:
    """The same rule as SQL, for a WHERE clause over a schema name column."""
    excluded = ", ".join(f"'{s}'" for s in ("pg_catalog", "information_schema", HISTORY_SCHEMA, *PLATFORM_SCHEMAS))
    return f"{column} not in ({excluded}) and {column} !~ '^pg_'"


INTEGRITY_SQL = ("select check_name, status, affected_rows, details from public.verify_data_integrity() "
                 "order by check_name")
