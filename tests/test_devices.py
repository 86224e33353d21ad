"""Device emulation and CPU placement: a profile pads every forward up to its time and never
below it, overruns are counted, profiles load or fail clearly, and the sides split apart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import tiny_model
from picospec.runtime.devices import (
    Cost,
    DeviceProfileError,
    Pacer,
    builtin_profiles,
    load_profile,
    pace,
)
from picospec.tools.stack.procs import parse_cpus, split_cpus


def test_builtin_profiles_are_the_papers_pairs() -> None:
    assert builtin_profiles() == ["paper-llama-1b-70b", "paper-qwen-0.6b-32b"]
    llama = load_profile("paper-llama-1b-70b")
    qwen = load_profile("paper-qwen-0.6b-32b")
    # calibrated from the paper's cloud-only AR: 6.87 and 13.89 tokens/s
    assert llama.ar_tokens_per_s == pytest.approx(6.87, rel=0.01)
    assert qwen.ar_tokens_per_s == pytest.approx(13.89, rel=0.01)
    for p in (llama, qwen):
        assert p.sources and p.draft.step_s < p.verify.step_s
        # a block of 4 draft tokens and a prefix token costs the step plus 4 per-token costs
        assert p.verify.seconds(5) == pytest.approx(p.verify.step_s + 4 * p.verify.per_token_s)
        # the edge drafts in float16 and prefills in float32 (this CPU has no fp16 GEMMs);
        # the cloud keeps the target in float32, so greedy output stays exactly ar's
        assert (p.draft.dtype, p.draft.prefill_dtype) == ("float16", "float32")
        assert p.verify.dtype is None and p.verify.prefill_dtype is None


def test_user_profiles_load_from_yaml_and_json(tmp_path: Path) -> None:
    doc = {
        "draft": {"device": "edge box", "step_s": 0.01},
        "verify": {"device": "cloud box", "step_s": 0.05, "per_token_s": 0.002},
    }
    (tmp_path / "mine.json").write_text(json.dumps(doc))
    (tmp_path / "mine.yaml").write_text(
        "name: yaml-box\ndraft: {device: e, step_s: 0.01}\nverify: {device: c, step_s: 0.05}\n"
    )
    j = load_profile(str(tmp_path / "mine.json"))
    assert j.name == "mine" and j.verify.seconds(3) == pytest.approx(0.054)
    assert load_profile(str(tmp_path / "mine.yaml")).name == "yaml-box"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no device profile"),
        ("draft: [1, 2]\n", "expected a mapping|draft"),
        ("draft: {device: e, step_s: -1}\nverify: {device: c, step_s: 0.1}\n", "step_s"),
        ("draft: {device: e, step_s: 0.01}\n", "verify"),
        ("draft: {device: e, step_s: 0.01, typo: 1}\nverify: {device: c, step_s: 1}\n", "typo"),
        ("{{{", "cannot read"),
        (
            "draft: {device: e, step_s: 0.01, prefill_dtype: float8}\n"
            "verify: {device: c, step_s: 1}\n",
            "prefill_dtype",
        ),
    ],
)
def test_bad_profiles_are_refused_clearly(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DeviceProfileError, match=message):
        load_profile(str(path))


def test_settings_refuse_an_unknown_profile() -> None:
    from pydantic import ValidationError

    from picospec.config import Settings

    with pytest.raises(ValidationError, match="no device profile"):
        Settings(device_profile="jetson-nonexistent")
    assert Settings(device_profile="paper-llama-1b-70b").device_profile == "paper-llama-1b-70b"


def test_pacer_pads_up_to_the_profile_and_never_below(monkeypatch: pytest.MonkeyPatch) -> None:
    import picospec.runtime.devices

    waits: list[float] = []
    monkeypatch.setattr(picospec.runtime.devices.time, "sleep", waits.append)
    seen: list[tuple[str, float, float]] = []
    pacer = Pacer(Cost(device="x", step_s=0.05, per_token_s=0.01), "draft")
    pacer.on_pace = lambda kind, real, target: seen.append((kind, real, target))
    # a fast forward of 3 tokens waits out the rest of 0.05 + 2 * 0.01
    assert pacer.pad(3, 0.001) == pytest.approx(0.07)
    assert waits == [pytest.approx(0.069)]
    # a forward slower than the profile keeps its real time: no wait, one overrun
    assert pacer.pad(1, 0.2) == 0.2
    assert waits == [pytest.approx(0.069)]
    step, fwd = pacer.stats["step"], pacer.stats["forward"]
    assert (step.forwards, step.overruns) == (1, 1)
    assert step.overrun_s == pytest.approx(0.15) and step.max_overrun_s == pytest.approx(0.15)
    assert (fwd.forwards, fwd.overruns) == (1, 0)
    assert fwd.emulated_s == pytest.approx(0.07) and fwd.real_s == pytest.approx(0.001)
    assert seen == [("forward", 0.001, pytest.approx(0.07)), ("step", 0.2, 0.05)]


def test_a_paced_model_takes_at_least_the_profile_time_and_gives_the_same_logits() -> None:
    import torch

    plain = tiny_model(seed=3)
    paced = tiny_model(seed=3)
    pace(paced, Pacer(Cost(device="slow box", step_s=0.03, per_token_s=0.01), "verify"))
    a, b = plain.new_cache(), paced.new_cache()
    torch.testing.assert_close(a.extend([1, 2, 3]), b.extend([1, 2, 3]))
    t0 = time.perf_counter()
    torch.testing.assert_close(a.extend([4]), b.extend([4]))
    assert time.perf_counter() - t0 >= 0.03
    # batched forwards are paced over all their tokens
    c = paced.new_cache()
    t0 = time.perf_counter()
    paced.forward_batch([b, c], [[5, 6], [1, 2, 3]])
    assert time.perf_counter() - t0 >= 0.03 + 4 * 0.01
    assert paced.pacer.stats["forward"].forwards == 2 and paced.pacer.stats["step"].forwards == 1


@pytest.mark.parametrize("layout", ["slots", "copy"])
def test_every_real_forward_is_paced_once_with_its_new_tokens(
    tiny_dirs: tuple[Path, Path], tmp_path: Path, layout: str
) -> None:
    """A model loaded under a device profile, in float16 with a float32 prefill twin (as the
    edge profiles run it): a prefill (on the twin over slots), a decode step, a second
    session's prefill and one forward of both sessions (varlen over slots, or padded copies)
    are paced once each, over their new tokens, and each lasts at least its profile time."""
    from picospec.config import Settings
    from picospec.runtime.loading import model_from_settings

    profile = tmp_path / "box.yaml"
    profile.write_text(
        "draft: {device: edge box, step_s: 0.01}\n"
        "verify: {device: cloud box, step_s: 0.03, per_token_s: 0.005}\n"
    )
    settings = Settings(
        model=str(tiny_dirs[0]),
        device="cpu",
        dtype="float16",
        prefill_dtype="float32",
        device_profile=str(profile),
    )
    lm = model_from_settings(settings, "verify")
    lm.kv_layout = layout
    assert lm.pacer is not None and lm.pacer.cost.device == "cloud box"
    assert lm.prefill_model is not None
    targets: list[float] = []  # the profile's time of each paced forward: one per token count
    lm.pacer.on_pace = lambda _kind, _real, target: targets.append(target)
    ran = {"model": 0, "twin": 0}
    for key, net in (("model", lm.model), ("twin", lm.prefill_model)):
        net.model.embed_tokens.register_forward_hook(
            lambda *_a, key=key: ran.__setitem__(key, ran[key] + 1)
        )
    cost, sizes = lm.pacer.cost, []

    def lasts_its_time(n: int, forward: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        forward()
        assert time.perf_counter() - t0 >= cost.seconds(n)

    a, b = lm.new_cache(), lm.new_cache()
    lasts_its_time(6, lambda: a.extend([5, 6, 7, 8, 9, 10]))
    lasts_its_time(1, lambda: a.extend([11]))
    lasts_its_time(4, lambda: b.extend([12, 13, 14, 15], keep=1))
    lasts_its_time(3, lambda: lm.forward_batch([a, b], [[16, 17], [18]], on_forward=sizes.append))
    assert sizes == [2] and lm.kv_counters.forwards == 4  # four real forwards, one batched
    assert targets == [cost.seconds(n) for n in (6, 1, 4, 3)]
    step, fwd = lm.pacer.stats["step"], lm.pacer.stats["forward"]
    assert (step.forwards, fwd.forwards) == (1, 3)
    assert step.emulated_s + fwd.emulated_s >= sum(cost.seconds(n) for n in (6, 1, 4, 3))
    # the forwards of 3 tokens or more ran on the twin over slots (and were paced once there)
    assert ran == ({"model": 1, "twin": 3} if layout == "slots" else {"model": 4, "twin": 0})
    # pacing again swaps the pacer without wrapping twice; pacing with None stops it
    again = Pacer(cost, "verify")
    pace(lm, again)
    a.extend([19])
    assert again.stats["step"].forwards == 1 and step.forwards == 1 and len(targets) == 4
    pace(lm, None)
    a.extend([20])
    assert again.stats["step"].forwards == 1 and lm.kv_counters.forwards == 6


def test_cpu_sets_split_the_machine_and_parse_lists() -> None:
    assert split_cpus([0, 1]) == (frozenset({0}), frozenset({1}))
    assert split_cpus([0, 1, 2, 3]) == (frozenset({0, 1}), frozenset({2, 3}))
    assert split_cpus([3, 5, 7]) == (frozenset({3}), frozenset({5, 7}))
    with pytest.raises(ValueError, match="2 CPUs"):
        split_cpus([0])
    assert parse_cpus("0") == {0} and parse_cpus("1-3") == {1, 2, 3}
    assert parse_cpus("0,2-3") == {0, 2, 3}
    for bad in ("", "a", "3-x", "-1"):
        with pytest.raises(ValueError):
            parse_cpus(bad)


def test_stack_config_pins_sides_apart_and_passes_the_profile() -> None:
    from picospec.tools.stack.up import Stack, StackConfig

    with pytest.raises(ValueError, match="disjoint"):
        StackConfig(topology="edge-cloud", edge_cpus=frozenset({0}), cloud_cpus=frozenset({0, 1}))
    with pytest.raises(ValueError, match="no device profile"):
        StackConfig(device_profile="nonexistent")
    cfg = StackConfig(
        topology="edge-cloud",
        edge_cpus=frozenset({0}),
        cloud_cpus=frozenset({1}),
        device_profile="paper-llama-1b-70b",
    ).with_free_ports()
    stack = Stack(cfg)  # laid out, not started
    assert stack.services["drafter"].cpus == {0} and stack.services["sampler"].cpus == {0}
    assert stack.services["verifier-1"].cpus == {1}
    assert stack.nats["nats-edge"].cpus == {0} and stack.nats["nats-hub"].cpus == {1}
    for svc in stack.services.values():
        assert svc.env["PICOSPEC_DEVICE_PROFILE"] == "paper-llama-1b-70b"
        assert svc.env["PICOSPEC_THREADS"] == "1"
    # every topology pins by default (2+ CPUs), the single NATS server with the cloud
    single = Stack(StackConfig(topology="single").with_free_ports())
    assert single.cpus is not None and single.services["drafter"].cpus == single.cpus["edge"]
    assert single.services["verifier-1"].cpus == single.nats["nats"].cpus == single.cpus["cloud"]
    assert StackConfig(topology="single", pin_cpus=False).cpu_sets() is None
    assert StackConfig(topology="edge-cloud", pin_cpus=False).cpu_sets() is None
