"""The sampler's functional core: one :class:`SampleRequest` in, one :class:`SampleReply` out."""

from __future__ import annotations

import torch

from picospec.protocol.codec import SampleReply, SampleRequest
from picospec.speculation.sampling import sample_correction


def sample(request: SampleRequest) -> SampleReply:
    """Draw the correction token from ``norm(max(0, p_j - q_j))``, reproducibly from its seed."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(request.seed % 2**63)
    token = sample_correction(request.sparse, torch.tensor(request.q), gen)
    return SampleReply(token=token)


def warm_up() -> None:
    """One draw before the sampler reports ready (first-touch costs of torch's kernels)."""
    import numpy as np

    from picospec.protocol.codec import sparse_from_probs

    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = np.array([0.2, 0.2, 0.3, 0.3], dtype=np.float32)
    sample(SampleRequest(sparse=sparse_from_probs(p, 4), q=q, seed=1))
