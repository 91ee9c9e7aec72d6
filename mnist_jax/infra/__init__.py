"""The machinery that keeps runs safe, behind the research code.

  storage       one path type for local and gs:// workdirs, atomic writes, the lock, cloud errors
  workdir       the workdir: mistakes as one line, the lock held for the run
  preemption    SIGTERM and Ctrl-C: a flag, agreed across processes, then save and exit
  distributed   JAX's multi-process runtime: start it, leave it together
  errors        the errors that mean the user must change something (one line, an exit status)
  process       process settings: the XLA:CPU flags, the caches, quiet logs

The training loop (`mnist_jax/train.py`) calls these through a few named functions.
"""
