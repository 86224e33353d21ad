"""The ``picospec`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from picospec import (
    DRAFT_DTYPE_HELP,
    DRAFT_DTYPES,
    DRAFTER_HELP,
    __version__,
    default_draft_dtype,
    default_drafter,
)

# what the `tools` extra installs (pyproject.toml): the services never import them
TOOLS_EXTRA = frozenset({"rich", "kubernetes", "matplotlib", "cryptography"})


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verifier", default="smollm2", help="target model (hub id, dir, .gguf)")
    p.add_argument(
        "--drafter",
        default=default_drafter(),
        help=DRAFTER_HELP,
    )
    p.add_argument(
        "--quantize-draft",
        choices=["none", "int8"],
        default="none",
        help="quantise the draft model on load (int8 dynamic, CPU)",
    )
    p.add_argument(
        "--draft-dtype", choices=DRAFT_DTYPES, default=default_draft_dtype(), help=DRAFT_DTYPE_HELP
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, …")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def _load_pair(args: argparse.Namespace, need_draft: bool) -> tuple[Any, Any]:
    from picospec.runtime.checkpoints import resolve
    from picospec.runtime.loading import load_model

    for name in (args.verifier, args.drafter) if need_draft else (args.verifier,):
        resolve(name)  # fail on a bad path before spending time loading the other model
    target = load_model(args.verifier, device=args.device, dtype=args.dtype, threads=args.threads)
    if not need_draft:
        return target, None
    draft_dtype = getattr(args, "draft_dtype", "auto")
    same = draft_dtype in ("auto", args.dtype)
    if args.drafter == args.verifier and args.quantize_draft == "none" and same:
        return target, target  # one set of weights; each session still has its own KV caches
    draft = load_model(
        args.drafter,
        device=args.device,
        dtype=args.dtype if draft_dtype == "auto" else draft_dtype,
        quantize=args.quantize_draft,
    )
    return target, draft


def cmd_generate(args: argparse.Namespace) -> int:
    from picospec.protocol.codec import ValueCodec
    from picospec.runtime.text import cut_at_stop
    from picospec.speculation.engine import generate
    from picospec.speculation.sampling import SamplingParams
    from picospec.speculation.spec import Mode, SpecConfig

    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    spec = SpecConfig(
        mode=Mode(args.mode),
        draft_len=args.draft_len,
        lookahead=args.lookahead,
        top_k=args.compress_k,
        value_codec=ValueCodec(args.value_codec),
    )
    target, draft = _load_pair(args, spec.mode is not Mode.AR)
    if args.raw:
        prompt = target.encode(args.prompt)
    else:
        prompt = target.encode_chat([{"role": "user", "content": args.prompt}])
    stops = args.stop or []

    def stopped(ids: list[int]) -> bool:
        return bool(stops) and cut_at_stop(target.decode(ids), stops)[1]

    result = generate(target, draft, prompt, params, spec, args.max_tokens, stopped)
    text = cut_at_stop(target.decode(result.tokens), stops)[0]
    if args.json:
        print(json.dumps({"text": text, **result.summary()}))
    else:
        print(text)
        s = result.summary()
        print(
            f"\n[{s['mode']}] {s['tokens']} tokens in {s['elapsed_s']:.2f}s "
            f"({s['tokens_per_s']:.1f} tok/s), acceptance {s['acceptance_rate']}, "
            f"rounds {s['rounds']}, rollbacks {s['rollbacks']}, "
            f"bytes up/down {s['bytes_up']}/{s['bytes_down']}",
            file=sys.stderr,
        )
    return 0


def cmd_tvd(args: argparse.Namespace) -> int:
    from picospec.speculation.analysis import tvd_table

    print(tvd_table(args))
    return 0


def cmd_draft_report(args: argparse.Namespace) -> int:
    from picospec.speculation.analysis import draft_report

    print(draft_report(args))
    return 0


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    """One flag per setting (``--nats-url`` for ``PICOSPEC_NATS_URL``); flags beat env vars."""
    from picospec.config import Settings

    for name, f in Settings.model_fields.items():
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"set_{name}",
            default=None,
            metavar=name.upper(),
            help=f.description,
        )


def _settings(args: argparse.Namespace) -> Any:
    from picospec.config import Settings

    return Settings(
        **{k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    )


def cmd_service(args: argparse.Namespace) -> int:
    from picospec.services.shell import run, setup_logging

    settings = _settings(args)
    setup_logging(args.command, args.log_level if args.log_level != "WARNING" else "INFO")
    if args.command == "verifier":
        from picospec.services.verifier.service import main as verifier_main

        return verifier_main(settings)
    if args.command == "sampler":
        from picospec.services.sampler.service import main as sampler_main

        return sampler_main(settings)
    from picospec.services.drafter.api import main as drafter_main

    return run(lambda stop: drafter_main(settings, stop))


def build_parser() -> argparse.ArgumentParser:
    from picospec.speculation.spec import Mode

    parser = argparse.ArgumentParser(prog="picospec", description=__doc__)
    parser.add_argument("--version", action="version", version=f"picospec {__version__}")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with every role in this process")
    g.add_argument("prompt")
    g.add_argument("--mode", choices=[m.value for m in Mode], default="picospec")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--draft-len", type=int, default=4, help="γ, draft tokens per block")
    g.add_argument("--lookahead", type=int, default=3, help="draft blocks in flight (picospec)")
    g.add_argument("--compress-k", type=int, default=256, help="K entries of p_j at a rejection")
    g.add_argument("--value-codec", choices=["f32", "f16", "u8"], default="f32")
    g.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("tvd", help="measure output TVD against compression K on real models")
    t.add_argument("--ks", default="1,4,16,64,256,1024,4096,49152")
    t.add_argument("--positions", type=int, default=64)
    t.add_argument("--text", default=None, help="text file whose positions are measured")
    _add_model_args(t)
    t.set_defaults(func=cmd_tvd, quantize_draft="int8")

    r = sub.add_parser("draft-report", help="int8 vs fp32 draft: speed and acceptance")
    r.add_argument("--max-tokens", type=int, default=48)
    _add_model_args(r)
    r.set_defaults(func=cmd_draft_report)

    for role, text in (
        ("drafter", "edge: the OpenAI API, draft model, pipeline"),
        ("verifier", "cloud: holds sessions' KV caches, verifies blocks"),
        ("sampler", "edge: draws correction tokens"),
    ):
        sp = sub.add_parser(
            role,
            help=text,
            description=f"{text}. Every flag can also be set as a PICOSPEC_* environment variable.",
        )
        _add_settings_args(sp)
        sp.set_defaults(func=cmd_service)

    from picospec.tools import bench, capacity, cluster, distill, stack

    stack.register(sub)
    bench.register(sub)
    capacity.register(sub)
    cluster.register(sub)
    distill.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        return int(args.func(args))
    except (ValueError, RuntimeError) as e:  # model, vocabulary and parameter errors
        print(f"picospec: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] not in TOOLS_EXTRA:
            raise
        print(
            f"picospec: error: this command needs {e.name.partition('.')[0]}, from the tools "
            "extra: pip install 'picospec[tools]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
