"""A quick check of the CUDA path (not a pytest test: run by hand on a GPU machine).

    python tests/gpu_check.py cuda      # or cpu; writes $OUT/gpucheck.json (default /tmp)

On tiny models (tests/tinymodels.py) in float32 and bfloat16, through the one-process engine:
greedy picospec, dssd and vanilla against ar (token for token), in the slot layout and in
transformers' cache layout, with the first divergence and the median top-2 logit gap; a sampled
run; then a SmolLM2-135M-shaped model with random weights in bfloat16: ar tokens/s per layout
and picospec with the self-draft. Needs picospec's dependencies importable (services/ is put
on the path). A first divergence of None means the answer equals ar's."""

# ruff: noqa: E402  (the path is set before picospec's imports)

import json
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "services")]
import torch

import tinymodels
from picospec.runtime.loading import load_model
from picospec.speculation.engine import generate
from picospec.speculation.sampling import SamplingParams
from picospec.speculation.spec import Mode, SpecConfig

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
out = {"device": dev, "torch": torch.__version__}
if dev == "cuda":
    out["gpu"] = torch.cuda.get_device_name(0)
root = Path(os.environ.get("OUT", "/tmp")) / "models"
tgt_dir = tinymodels.build(root / "target", seed=1)
drf_dir = tinymodels.build(root / "draft", seed=2, like=tgt_dir, noise=0.05)


QUESTIONS = ["Hello there", "Write a poem about the sea.", "What is 2+2?", "Tell me a story"]
GREEDY = SamplingParams(temperature=0.0)


def run(target, draft, prompts, mode, params, n):
    spec = SpecConfig(mode=mode, draft_len=4)
    return [generate(target, draft, p, params, spec, n) for p in prompts]


def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


# Greedy identity per precision and cache layout: every speculative mode against ar, where the
# first divergence falls, and how close to ties the target's choices are (median top-2 gap).
for dtype, layout in (("float32", "slots"), ("bfloat16", "slots"), ("bfloat16", "copy")):
    t = load_model(str(tgt_dir), device=dev, dtype=dtype)
    d = load_model(str(drf_dir), device=dev, dtype=dtype)
    t.kv_layout = d.kv_layout = layout
    prompts = [t.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    ar = run(t, None, prompts, Mode.AR, GREEDY, 64)
    for mode in (Mode.PICOSPEC, Mode.DSSD, Mode.VANILLA):
        sp = run(t, d, prompts, mode, GREEDY, 64)
        out[f"{dtype}_{layout}_{mode.value}_first_divergence"] = [
            first_diff(a.tokens, b.tokens) for a, b in zip(ar, sp, strict=True)
        ]
    with torch.no_grad():
        ids = torch.tensor([prompts[0] + ar[0].tokens], device=dev)
        lg = t.model(ids).logits[0, len(prompts[0]) - 1 : -1].float()
        top2 = lg.topk(2, -1).values
        out[f"{dtype}_{layout}_median_top2_gap"] = float((top2[:, 0] - top2[:, 1]).median())
    sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=7)
    sp = run(t, d, prompts, Mode.PICOSPEC, sampled, 64)
    out[f"{dtype}_{layout}_sampled_ok"] = all(len(r.tokens) > 0 for r in sp)

# A SmolLM2-135M-shaped model (random weights) in bf16: ar vs picospec (self-draft) speed on the GPU
if dev == "cuda":
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tinymodels.tokenizer()
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    p = root / "smol-shaped"
    m.save_pretrained(p)
    tok.save_pretrained(p)
    t = load_model(str(p), device=dev, dtype="bfloat16")
    prompts = [
        t.encode_chat([{"role": "user", "content": "Explain speculative decoding " * k}])
        for k in (1, 2, 3, 4)
    ]
    g = SamplingParams(temperature=0.0, ban_ids=tuple(t.eos_ids), ban_before=10**6)
    run(t, None, prompts[:1], Mode.AR, g, 16)
    run(t, t, prompts[:1], Mode.PICOSPEC, g, 16)  # warm
    for layout in ("slots", "copy"):
        t.kv_layout = layout
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = run(t, None, prompts[:2], Mode.AR, g, 64)
        torch.cuda.synchronize()
        out[f"smol_bf16_ar_{layout}_tokens_per_s"] = sum(len(x.tokens) for x in r) / (
            time.perf_counter() - t0
        )
    t.kv_layout = "slots"
    for mode, draft in ((Mode.AR, None), (Mode.PICOSPEC, t)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = run(t, draft, prompts, mode, g, 128)
        torch.cuda.synchronize()
        el = time.perf_counter() - t0
        out[f"smol_bf16_{mode.value}_tokens_per_s"] = sum(len(x.tokens) for x in r) / el
        out[f"smol_bf16_{mode.value}_tokens"] = [x.tokens[:8] for x in r][:1]
    out["smol_bf16_picospec_identical_to_ar"] = (
        out["smol_bf16_ar_tokens"] == out["smol_bf16_picospec_tokens"]
    )
print(json.dumps(out, indent=1))
Path(os.environ.get("OUT", "/tmp"), "gpucheck.json").write_text(json.dumps(out, indent=1))
