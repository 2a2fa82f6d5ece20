#!/usr/bin/env bash
# Configure an OpenBao (or HashiCorp Vault) server for the credential broker.
#
# The same configuration `broker dev` and the tests apply (broker/stack/vault_setup.py);
# keep the two in step. Safe to re-run: mounts and auth methods are enabled only when
# missing, everything else is an overwrite with the same content.
#
# Run it with an admin token (not root in production: a token allowed to manage mounts,
# auth methods, policies and token roles), for example:
#
#   export BAO_ADDR=https://openbao.example.org:8200 BAO_TOKEN=...   # or VAULT_ADDR/VAULT_TOKEN
#   PG_HOST=db.example.org PG_DB=analytics PG_ADMIN_USER=vault PG_ADMIN_PASSWORD=... \
#     ./vault-config/setup.sh
#
# Inputs (environment):
#   VAULT_BIN          CLI to use: bao (default) or vault
#   PG_HOST, PG_PORT   target Postgres (host name or IP; port default 5432)
#   PG_DB              database the dynamic users may read (default analytics)
#   PG_ADMIN_USER      role Vault connects as; needs CREATEROLE and the right to grant on
#                      the schema (and pg_signal_backend to terminate sessions on revoke)
#   PG_ADMIN_PASSWORD  its password (empty: no password, e.g. trust on a dev socket)
#   PG_SSLMODE         default verify-full; `disable` only on a loopback dev server
#   TASK_ROLE          token role for per-task tokens (default broker-task)
#   POLICY_PREFIX      prefix of the per-task-type policies (default broker-task-)
#   CHILD_POLICIES     comma list of policies vault_token credentials may hand out
#                      (default reports-read); each must exist
#   PKI_DOMAIN         domain agent certificates live under (default agents.example.org)
#   BROKER_AUTH        how the broker logs in: approle (default), token, or none
#   JWT_PUBKEY_FILE    optional: PEM public key(s) of the agents' issuer, to let agents log
#   JWT_ISSUER         in to OpenBao directly (the "peer" flow the benchmark compares with)
#
# Prerequisite in Postgres (run once as the DB owner): the `analytics` schema with its
# tables, and `REVOKE CONNECT ON DATABASE <db> FROM PUBLIC` so that only the dynamic users
# (granted CONNECT on creation) log in. See vault-config/README.md.

set -euo pipefail

BAO="${VAULT_BIN:-bao}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PG_HOST="${PG_HOST:?set PG_HOST}"
PG_PORT="${PG_PORT:-5432}"
PG_DB="${PG_DB:-analytics}"
PG_ADMIN_USER="${PG_ADMIN_USER:?set PG_ADMIN_USER}"
PG_ADMIN_PASSWORD="${PG_ADMIN_PASSWORD:-}"
PG_SSLMODE="${PG_SSLMODE:-verify-full}"
TASK_ROLE="${TASK_ROLE:-broker-task}"
POLICY_PREFIX="${POLICY_PREFIX:-broker-task-}"
CHILD_POLICIES="${CHILD_POLICIES:-reports-read}"
PKI_DOMAIN="${PKI_DOMAIN:-agents.example.org}"
BROKER_AUTH="${BROKER_AUTH:-approle}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

mounted() {  # mounted secrets|auth PATH
  # Not `list | grep -q`: under pipefail, grep exiting early SIGPIPEs the CLI and the
  # pipeline "fails" exactly when the mount exists.
  local listing
  listing="$("$BAO" "$1" list -format=json)"
  [[ "$listing" == *"\"$2/\""* ]]
}

# --- database secrets engine -----------------------------------------------------------
mounted secrets database || "$BAO" secrets enable database

# The URL keeps {{username}}/{{password}} templates: the password lives only in its own
# write-only field and never shows up when the config is read back.
if [[ -n "$PG_ADMIN_PASSWORD" ]]; then
  "$BAO" write database/config/analytics \
    plugin_name=postgresql-database-plugin \
    connection_url="postgresql://{{username}}:{{password}}@${PG_HOST}:${PG_PORT}/${PG_DB}?sslmode=${PG_SSLMODE}" \
    username="$PG_ADMIN_USER" password="$PG_ADMIN_PASSWORD" \
    allowed_roles="analytics-ro,app-rw" verify_connection=true \
    max_open_connections=16 max_idle_connections=8
else
  "$BAO" write database/config/analytics \
    plugin_name=postgresql-database-plugin \
    connection_url="postgresql://${PG_ADMIN_USER}@${PG_HOST}:${PG_PORT}/${PG_DB}?sslmode=${PG_SSLMODE}" \
    allowed_roles="analytics-ro,app-rw" verify_connection=true \
    max_open_connections=16 max_idle_connections=8
fi

# Creation: a login role whose password stops working at VALID UNTIL even if Vault never
# revokes it, and whose privileges come from joining a group role made once in the target
# database (analytics_reader / analytics_writer, see README.md). A grant per user instead
# rewrites each table's ACL, which grows with every live user: creating and dropping users
# got 3x slower with 1,000 of them alive. Revocation: idempotent (Vault retries failures);
# it kills sessions that are already open, which VALID UNTIL does not (vault#10681), and
# revokes grants only from a user that has some (made by older creation statements),
# since a REVOKE rewrites every table's catalog row even when there is nothing to revoke.
# Vault runs a statement that contains $$ as one unit instead of splitting it at ';'.
cat >"$work/create-ro.sql" <<SQL
CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' IN ROLE analytics_reader;
SQL
cat >"$work/create-rw.sql" <<SQL
CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' IN ROLE analytics_writer;
SQL
cat >"$work/revoke.sql" <<SQL
DO \$\$
DECLARE
  user_oid oid := (SELECT oid FROM pg_roles WHERE rolname = '{{name}}');
BEGIN
  IF user_oid IS NOT NULL THEN
    PERFORM pg_terminate_backend(pid, 5000) FROM pg_stat_get_activity(NULL) WHERE usesysid = user_oid;
    IF EXISTS (SELECT 1 FROM pg_shdepend WHERE refobjid = user_oid AND deptype = 'a') THEN
      REVOKE ALL ON ALL TABLES IN SCHEMA analytics FROM "{{name}}";
      REVOKE ALL ON ALL SEQUENCES IN SCHEMA analytics FROM "{{name}}";
      REVOKE USAGE ON SCHEMA analytics FROM "{{name}}";
      REVOKE CONNECT ON DATABASE "${PG_DB}" FROM "{{name}}";
    END IF;
    DROP ROLE "{{name}}";
  END IF;
END
\$\$;
SQL
# Every broker role has an explicit max_ttl (V12); the per-task token's TTL is the
# tighter bound in practice, since a lease never outlives the token that created it.
"$BAO" write database/roles/analytics-ro db_name=analytics default_ttl=300 max_ttl=900 \
  creation_statements=@"$work/create-ro.sql" revocation_statements=@"$work/revoke.sql"
"$BAO" write database/roles/app-rw db_name=analytics default_ttl=300 max_ttl=900 \
  creation_statements=@"$work/create-rw.sql" revocation_statements=@"$work/revoke.sql"

# --- PKI ---------------------------------------------------------------------------------
# A self-signed root only if none exists; in production import or chain to your own CA
# (pki/intermediate/...) instead.
if ! mounted secrets pki; then
  "$BAO" secrets enable pki
  "$BAO" secrets tune -max-lease-ttl=87600h pki
fi
if ! "$BAO" read -field=certificate pki/cert/ca >/dev/null 2>&1; then
  "$BAO" write -field=serial_number pki/root/generate/internal \
    common_name="Credential Broker Root CA" ttl=87600h key_type=ec >/dev/null
fi
# generate_lease: each certificate gets a lease owned by the task token, so finishing the
# task (or its token expiring) revokes the certificate. Costs storage per certificate:
# fine for short-lived agent certs; at very high volume prefer no lease and short TTLs.
"$BAO" write pki/roles/agents \
  allowed_domains="$PKI_DOMAIN" allow_subdomains=true allow_bare_domains=false \
  allow_localhost=false allow_ip_sans=false max_ttl=1h generate_lease=true \
  key_type=ec key_bits=256

# --- kv v2 and the policy a vault_token credential hands out ----------------------------
mounted secrets secret || "$BAO" secrets enable -path=secret -version=2 kv
"$BAO" policy write reports-read - <<'HCL'
path "secret/data/reports/*" {
  capabilities = ["read"]
}
HCL

# --- per-task token role ----------------------------------------------------------------
# orphan: the broker's own token expiring must not revoke task credentials, and a task's
# credentials die with the task token (its TTL = the task's). Non-renewable, so nothing
# extends a task. allowed_policies_glob = the policies the broker writes per task type;
# allowed_policies = what vault_token credentials may carry, and nothing else.
"$BAO" write "auth/token/roles/${TASK_ROLE}" \
  allowed_policies_glob="${POLICY_PREFIX}*" \
  allowed_policies="$CHILD_POLICIES" \
  disallowed_policies="broker,root" \
  orphan=true renewable=false token_type=service token_explicit_max_ttl=3600

# --- the broker's own policy and login ---------------------------------------------------
"$BAO" policy write broker "$HERE/broker-policy.hcl"

case "$BROKER_AUTH" in
  approle)
    # Periodic tokens: the broker renews its token (renew_self); if it ever lapses, task
    # tokens (orphans) keep living until their own TTL, and nothing new is issued.
    mounted auth approle || "$BAO" auth enable approle
    "$BAO" write auth/approle/role/credential-broker \
      token_policies=broker token_no_default_policy=true token_period=24h \
      secret_id_ttl=0 token_type=service
    echo "broker: role_id = $("$BAO" read -field=role_id auth/approle/role/credential-broker/role-id)"
    echo "broker: get a secret_id with: $BAO write -f auth/approle/role/credential-broker/secret-id"
    ;;
  token)
    # A periodic orphan token, printed once: put it in the broker's secret store.
    token="$("$BAO" token create -orphan -policy=broker -no-default-policy -period=24h \
      -display-name=credential-broker -field=token)"
    printf 'broker token:\n%s\n' "$token"
    ;;
  none) ;;
  *) echo "BROKER_AUTH must be approle, token or none" >&2; exit 2 ;;
esac

# --- optional: agents log in with their own JWT (peer flow) -----------------------------
if [[ -n "${JWT_PUBKEY_FILE:-}" ]]; then
  "$BAO" policy write peer-analytics - <<'HCL'
path "database/creds/analytics-ro" {
  capabilities = ["read"]
}
path "pki/issue/agents" {
  capabilities = ["update"]
}
HCL
  mounted auth jwt || "$BAO" auth enable jwt
  "$BAO" write auth/jwt/config jwt_validation_pubkeys=@"$JWT_PUBKEY_FILE" \
    bound_issuer="${JWT_ISSUER:?set JWT_ISSUER with JWT_PUBKEY_FILE}"
  "$BAO" write auth/jwt/role/agent role_type=jwt user_claim=sub bound_audiences=openbao \
    token_policies=peer-analytics token_no_default_policy=true token_ttl=900 token_max_ttl=900
fi

echo "credential broker configuration applied to ${BAO_ADDR:-${VAULT_ADDR:-the default address}}"
