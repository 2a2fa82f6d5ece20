"""HTTP layer: each handler parses, calls one service, renders. Nothing else."""
