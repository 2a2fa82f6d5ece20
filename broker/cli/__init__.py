"""The `broker` command line: server, scheduler, migrations, operators, approvers, policy, dev."""
