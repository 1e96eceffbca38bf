"""SLURM: submit a batch job whose node tasks run workers and the balancer across the allocation."""
