# ACL policy for the credential broker's own token. Nothing here needs sudo.

# Mint per-task tokens, only through the task token role (orphan, non-renewable,
# TTL-capped; the role's allowed_policies bound what a task token can carry).
path "auth/token/create/broker-task" {
  capabilities = ["update"]
}

# Revoke per-task tokens and vault_token children by accessor; check if one is alive.
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}
path "auth/token/lookup-accessor" {
  capabilities = ["update"]
}

# Its own token: look up (renewable?) and renew (periodic token).
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}

# Revoke one lease synchronously, then confirm it is gone.
path "sys/leases/revoke" {
  capabilities = ["update"]
}
path "sys/leases/lookup" {
  capabilities = ["update"]
}

# Give a lease the task's TTL instead of its role's default (one renew with `increment`).
path "sys/leases/renew" {
  capabilities = ["update"]
}

# Write the generated per-task-type ACL policies, and only those.
path "sys/policies/acl/broker-task-*" {
  capabilities = ["create", "update"]
}

# Not granted: listing leases (sys/leases/lookup/<prefix>/ with LIST) needs sudo. The
# broker does not need it: a crash leaves leases tied to a recorded task token, which
# revoke-accessor cleans up. Grant it only if you run an orphan sweep by listing:
# path "sys/leases/lookup/database/creds/*" {
#   capabilities = ["list", "sudo"]
# }
