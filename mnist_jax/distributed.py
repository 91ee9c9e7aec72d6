"""Multi-host runs on JAX's own distributed runtime.

`initialize()` with no arguments lets JAX detect the cluster (TPU pods, Slurm, Open MPI);
elsewhere pass the coordinator's address, the number of processes and this process's id.
Call it before anything touches a JAX device.
"""

import jax


def initialize(coordinator_address: str = '', num_processes: int = 0,
               process_id: int = -1) -> None:
  # CPU processes need a collectives backend to all-reduce across hosts (GPU/TPU ignore it).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  explicit = dict(coordinator_address=coordinator_address or None,
                  num_processes=num_processes or None,
                  process_id=process_id if process_id >= 0 else None)
  jax.distributed.initialize(**explicit)
