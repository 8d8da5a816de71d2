"""``sluice debug``: profiles, memory snapshots and thread stacks of running processes."""
