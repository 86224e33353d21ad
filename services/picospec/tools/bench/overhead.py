"""``picospec bench --overhead``: the software cost of one verification round, without the model.

A round is: the drafter encodes a block and publishes it, NATS carries it to the verifier, the
verifier decodes it, queues it, runs the model forward on its model thread, runs the acceptance
test, encodes the verdict and publishes it, NATS carries it back, the drafter decodes and
applies it. Everything but the model forward is overhead, and it is paid once per block.

Measured on a real local stack on loopback (one nats-server, the real services, the embedded
model), one session at a time in ``dssd`` mode (one block in flight, so nothing queues):

- ``round_trip``: the drafter's block round trip (``picospec_verify_round_trip_seconds``);
- ``verifier_batch``: the verifier's time for the block on its model thread, model forward and
  acceptance test together (``picospec_verify_forward_seconds``, less the requests' prefills,
  timed alone on the same prompts with one-token requests, the median of 3 each);
- ``acceptance_test``: the acceptance test alone (processing a block's target logits into
  probabilities and deciding it), timed in this process on logits of the model's vocabulary;

so ``overhead = round_trip - verifier_batch + acceptance_test``: the codec, the two NATS hops
and both services' Python and thread hand-offs, plus the acceptance test. The breakdown times
the codec and a bare NATS request/reply on the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

FORWARD = "picospec_verify_forward_seconds"  # the verifier's model-thread histogram
MEASURE_PROMPTS = (
    "Write a short poem about the sea.",
    "List five uses of a paperclip.",
    "Explain photosynthesis to a child.",
    "Describe a busy market in the morning.",
)


def _median_us(fn: Any, n: int) -> float:
    for _ in range(min(20, n)):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def codec_us(vocab: int, draft_len: int = 4) -> dict[str, float]:
    """Encode + decode of a block of ``draft_len`` tokens and of its verdict (median µs)."""
    from picospec.protocol.codec import DraftBlock, Verdict, decode_as, encode

    block = DraftBlock(
        session=os.urandom(16), epoch=0, seq=1, pos=100, prefix=(5,),
        tokens=tuple(range(7, 7 + draft_len)), q=(0.5,) * draft_len, vocab_size=vocab,
    )  # fmt: skip
    verdict = Verdict(session=block.session, epoch=0, seq=1, accepted=2, token=9, vocab_size=vocab)
    return {
        "block_us": _median_us(lambda: decode_as(encode(block), DraftBlock), 2000),
        "verdict_us": _median_us(lambda: decode_as(encode(verdict), Verdict), 2000),
    }


def acceptance_test_us(vocab: int, draft_len: int = 4) -> float:
    """The verifier's acceptance test of one block (greedy), on random logits (median µs)."""
    import torch

    from picospec.speculation.sampling import (
        Rng,
        SamplingParams,
        probs_from_logits,
        verify_separate,
    )

    logits = torch.randn(draft_len + 1, vocab)
    params = SamplingParams(temperature=0.0)
    tokens = [int(t) for t in logits[:draft_len].argmax(-1)]

    def run() -> None:
        p = probs_from_logits(logits[:draft_len], params)
        verify_separate(p, tokens, [1.0] * draft_len, params, Rng(0), 0, 256)
        probs_from_logits(logits[-1], params)

    return _median_us(run, 200)


async def nats_request_us(url: str, n: int = 2000) -> float:
    """A 64-byte request/reply through the server on loopback, one hop each way (median µs)."""
    import nats

    nc = await nats.connect(url)
    try:

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("picospec.tools.bench.echo", cb=echo)
        payload = os.urandom(64)
        times = []
        for i in range(n + 50):
            t0 = time.perf_counter()
            await nc.request("picospec.tools.bench.echo", payload, timeout=5)
            if i >= 50:
                times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    finally:
        await nc.drain()


def _open_s(api: str, verifier: str, prompt: str, args: argparse.Namespace) -> float:
    """The verifier's forward time for one one-token request of ``prompt``: its prefill."""
    from picospec.tools.bench.run import _histogram_means, _stream

    before = _histogram_means(verifier, (FORWARD,))[FORWARD]
    _stream(api, prompt, "dssd", args)
    after = _histogram_means(verifier, (FORWARD,))[FORWARD]
    if after[1] - before[1] != 1:
        raise RuntimeError(f"a one-token request took {after[1] - before[1]:.0f} forwards, not 1")
    return after[0] - before[0]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start a loopback stack, run ``dssd`` requests one at a time, and report the overhead."""
    from picospec.tools.bench.run import _histogram_means, _mean_between, _stream
    from picospec.tools.stack.up import Stack, StackConfig

    cfg = StackConfig(
        topology="single",
        verifiers=1,
        drafter_model=args.drafter,
        verifier_model=args.verifier,
        threads=1,
        env={"PICOSPEC_REQUEST_TIMEOUT_S": "120", "PICOSPEC_VERIFY_TIMEOUT_S": "30"},
        ready_timeout=600.0,
        log_level="WARNING",
    ).with_free_ports()
    names = ("picospec_verify_round_trip_seconds",)
    fwd = (FORWARD,)
    run_args = argparse.Namespace(**{**vars(args), "draft_len": 4})
    opens_args = argparse.Namespace(**{**vars(run_args), "max_tokens": 1})
    with Stack(cfg) as stack:
        drafter, verifier = stack.services["drafter"].url, stack.services["verifier-1"].url
        _stream(stack.api_url, MEASURE_PROMPTS[0], "dssd", run_args)  # warm
        # The forward histogram also holds each request's prefill: time each prompt's open
        # alone (a one-token request: its prefill, no block), the median of 3, and take them out
        opens = sum(
            statistics.median(_open_s(stack.api_url, verifier, p, opens_args) for _ in range(3))
            for p in MEASURE_PROMPTS
        )
        before_rtt, before_fwd = _histogram_means(drafter, names), _histogram_means(verifier, fwd)
        for prompt in MEASURE_PROMPTS:
            _stream(stack.api_url, prompt, "dssd", run_args)
        after_rtt, after_fwd = _histogram_means(drafter, names), _histogram_means(verifier, fwd)
        nats_us = asyncio.run(nats_request_us(stack.nats_url))
        from picospec.runtime.loading import load_model

        vocab = load_model(args.verifier, device="cpu").vocab_size
    rounds = int(after_rtt[names[0]][1] - before_rtt[names[0]][1])
    rtt = _mean_between(before_rtt[names[0]], after_rtt[names[0]]) or 0.0
    start, end = before_fwd[fwd[0]], after_fwd[fwd[0]]
    batch = _mean_between(start, (end[0] - opens, end[1] - len(MEASURE_PROMPTS))) or 0.0
    test_us = acceptance_test_us(vocab)
    codec = codec_us(vocab)
    overhead_ms = (rtt - batch) * 1e3 + test_us / 1e3
    return {
        "rounds": rounds,
        "round_trip_ms": rtt * 1e3,
        "verifier_batch_ms": batch * 1e3,
        "acceptance_test_ms": test_us / 1e3,
        "overhead_ms": overhead_ms,
        "breakdown": {
            "codec_block_us": codec["block_us"],
            "codec_verdict_us": codec["verdict_us"],
            "nats_request_reply_us": nats_us,
            "python_and_hand_offs_ms": overhead_ms
            - (codec["block_us"] + codec["verdict_us"] + nats_us + test_us) / 1e3,
        },
        "vocab": vocab,
        "mode": "dssd",
        "draft_len": 4,
        "topology": "single nats-server on loopback",
        "goal_ms": 2.0,
    }
