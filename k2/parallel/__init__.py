"""Everything distributed, applied to a built single-device model from outside (model code never imports this).

``init_parallel`` builds the run's ``ParallelState`` (``k2.parallel.mesh``: torch.distributed from torchrun, the
``pp × dp`` device mesh, expert-parallel groups drawn from dp); ``k2.parallel.data_parallel`` holds what the
trainer needs for data parallelism (row slices of the global batch, the gradient average, reductions);
``k2.parallel.expert`` replaces the MoE experts by this rank's expert-parallel slice (``apply_expert_parallel``).
"""

from k2.parallel.mesh import ParallelState, init_parallel, local_rank_from_env, world_size_from_env

__all__ = ["ParallelState", "init_parallel", "local_rank_from_env", "world_size_from_env"]
