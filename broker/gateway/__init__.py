"""The credential gateway: agents connect with a handle, the gateway uses the real credential.

`pgwire` frames the Postgres v3 protocol, `scram` checks a handle by SCRAM-SHA-256 on the
server side, and `pgproxy` runs the per-connection sessions that log in upstream with the
real credential and relay, inspecting every statement.
"""
