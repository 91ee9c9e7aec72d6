"""Multi-host runs on JAX's own distributed runtime.

`initialize()` with no arguments lets JAX detect the cluster (TPU pods, Slurm, Open MPI);
elsewhere pass the coordinator's address, the number of processes and this process's id.
Call it before anything touches a JAX device.

`leave()` ends a process's part in the run. Process 0 hosts the runtime's coordination
service, so it must not exit before the others are done with it: a peer still finishing its
save, or just polling the service, would be aborted ("the JAX distributed service detected
fatal errors"). JAX's own exit hook waits for every process (`jax.distributed.shutdown`, a
barrier), but run.py exits without exit hooks; it calls `leave` instead.
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


def leave(agreed: bool) -> None:
  """Leaves the distributed runtime, if this is a multi-process run.

  agreed: every process is leaving at this point (the run finished, or stopped by a decision
    they shared): wait for all, then shut down together. Otherwise (an error only this
    process met) leave at once: the others may be waiting in a collective for this one and
    would never reach the barrier.
  """
  if agreed and jax.distributed.is_initialized():
    try:
      jax.distributed.shutdown()
    except Exception:  # pylint: disable=broad-except
      pass  # A peer died meanwhile: the run's outcome is already said and saved; exit anyway.
