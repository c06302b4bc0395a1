"""A run's life cycle on disk and under signals: atomic checkpoints (checkpoint), the run folder's
lock, resume decisions and repair (runfolder), stop signals and timed saves (preempt)."""
