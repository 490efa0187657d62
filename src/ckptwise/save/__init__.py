"""The write path: a decided save becomes a committed checkpoint.

:mod:`~ckptwise.save.pipeline` captures the state and hands the commit to a writer
(:mod:`~ckptwise.save.writer`: on the caller's thread or in the background, at the priority of
:mod:`~ckptwise.priority`); :mod:`~ckptwise.save.upkeep` keeps the run folder in order
around each commit (rollback branches, the resume point, pruning).
"""

__all__: list[str] = []
