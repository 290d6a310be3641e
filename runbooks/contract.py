"""The contract (../shared/contract.md) as the code reads it: names every module shares, named once.

A change to the contract is one edit here plus the SQL that it describes; tests check the SQL files
against these names.
"""

from __future__ import annotations

# The core tables phase 2 (sql/001_core_schema.sql) creates or converges, parents before children:
# the order in which the phase takes their locks.
CORE_TABLES = ("organizations", "profiles", "organization_members", "products", "inventory", "api_keys",
               "audit_logs", "security_events")

# Legacy api_keys columns that hold a plaintext key (phase 2 hashes, redacts and drops them).
PLAINTEXT_KEY_COLUMNS = ("key", "api_key", "secret", "secret_key", "token", "plaintext_key", "plain_key", "raw_key",
                         "key_value")
