"""The save decision at each step: the policies fed with the clock, the reported metrics
(:mod:`~ckptwise.decide.metrics`), the run's history (:mod:`~ckptwise.decide.progress`),
signals and request files (:mod:`~ckptwise.decide.monitor`) and what saves cost training
(:mod:`~ckptwise.decide.felt`); :class:`~ckptwise.decide.decider.Decider` joins them, and
with several ranks makes rank 0's decision every rank's.
"""

__all__: list[str] = []
