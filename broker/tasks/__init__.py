"""Tasks from the workload's side: start, claim, finish and read (`service`), issuing all
or nothing (`issuing`), and the per-process pool of ready task tokens (`token_pool`). The
states they move tasks through are `broker.lifecycle`'s."""
