"""The sampler: stateless correction draws from compressed ``p_j`` and the drafter's ``q_j``."""

from picospec.sampler.core import sample

__all__ = ["sample"]
