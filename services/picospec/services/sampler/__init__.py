"""The sampler (edge): stateless correction draws from a compressed ``p_j`` and the drafter's
``q_j``, on NATS (:mod:`~picospec.services.sampler.service`). Its functional core is
:mod:`picospec.speculation.sampler`."""
