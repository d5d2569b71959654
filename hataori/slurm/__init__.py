"""Slurm launch of ``hataori pretrain``: sbatch scripts, submission, status, preemption.

``hataori slurm submit`` renders a batch script from :class:`~hataori.slurm.config.SlurmConfig`
(:mod:`hataori.slurm.sbatch`), records it and the resolved training config in the run folder, and
submits it. Each job step runs one training process per GPU (or per CPU slot) through ``srun``.

Time limits and preemption: the job asks for SIGUSR1 some minutes before its time limit. The batch
shell forwards it to the training processes, whose handlers (:mod:`hataori.train.signals`) make the
trainer stop after the current step with a checkpoint. When the processes have exited and the run
has not reached its last step, the batch shell requeues the job (up to ``max_requeues`` times); the
next attempt resumes from the latest complete checkpoint, data loader position included.
``hataori slurm status RUN`` shows the job's state, the last step and the last complete checkpoint.
"""
