"""The gateway: credentials a workload uses through the broker but never holds (docs/gateway.md).

- `pgwire` frames the Postgres v3 protocol, `scram` checks a handle by SCRAM-SHA-256 on
  the server side, and `pgproxy` runs the per-connection sessions that log in upstream
  with the real credential and relay, inspecting every statement;
- `handles` makes what a start answers instead of a credential;
- `service` is what the sessions ask of the broker (is this handle good, with what does
  it log in, may this statement run), issuing a task's credential on first use;
- `events` writes their audit events in batches, `listener` hears of task ends, and
  `runner` puts the process together (`broker gateway`).
"""
