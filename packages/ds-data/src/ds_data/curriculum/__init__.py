"""Curriculum learning: difficulty schedules and sequence-length batch transforms."""

from ds_data.curriculum.batch import batch_seqlen, reshape_batch, truncate_batch
from ds_data.curriculum.scheduler import CurriculumScheduler

__all__ = ["CurriculumScheduler", "batch_seqlen", "reshape_batch", "truncate_batch"]
