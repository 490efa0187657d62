"""The read path: a run as a read-only :class:`~ckptwise.read.run.Run` (list, resolve
best/latest, load, restore with fallback, verify, export), restore planning
(:mod:`~ckptwise.read.restoring`), what checkpoints cost (:mod:`~ckptwise.read.usage`), lossy
archive copies (:mod:`~ckptwise.read.archive`) and files other tools read
(:mod:`~ckptwise.read.formats`).
"""

__all__: list[str] = []
