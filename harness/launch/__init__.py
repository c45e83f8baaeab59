"""Starting ranks: one machine, a hostfile over pdsh/ssh, mpirun, or a Slurm batch job.

Every launcher runs the same per-rank entry, ``python -u -m harness.train.entry --run-dir RUN_DIR``;
the run directory (see :mod:`harness.rundir`) carries the spec and the DeepSpeed config, so nothing
but a path crosses a shell. The builders here are pure (no torch, no deepspeed, no subprocess):

    hostfile.py   strict DeepSpeed hostfile parsing (errors carry line numbers) and include/exclude
    shell.py      quoting and control-character rejection for anything that reaches a shell
    envfile.py    the 0600 env file that carries launch.env values (secrets included) to remote ranks
    commands.py   (cmd, env) for the local, pdsh and openmpi launchers
    slurm.py      the sbatch script (one srun task per GPU, preemption trap, requeue)
    slurm_checks.py  what every value bound for an sbatch script must satisfy (a check_spec rule too)
    rankenv.py    per-rank mapping of SLURM_* / OMPI_COMM_WORLD_* to RANK / LOCAL_RANK / WORLD_SIZE
    cli.py        ``harness train`` and ``harness slurm``
"""

ENTRY_MODULE = "harness.train.entry"
"""The per-rank training entry every launcher starts (``python -u -m harness.train.entry --run-dir D``)."""
