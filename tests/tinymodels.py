"""Tiny models saved to disk with a real (character-level) tokenizer and chat template.

The service processes load models by path like any Hugging Face model, so integration tests
build these once per session: two 2-layer Llamas with different random weights (target and
draft) sharing one tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHARS = list(string.ascii_letters + string.digits + " \n.,!?'-:;()")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
    )


# every tiny model's shape: 2 layers, 4 heads of which 2 key/value heads, hidden size 32
SHAPE: dict[str, int] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def build(
    path: Path, seed: int, sharpness: float = 2.0, like: Path | None = None, noise: float = 0.0
) -> Path:
    """Save a tiny Llama + the shared tokenizer to ``path``; return it.

    With ``like``, start from that model's weights plus Gaussian ``noise`` (relative): a draft
    that agrees with its target often but not always, as a real small/large pair does.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    vocab = len(SPECIALS) + len(CHARS)
    cfg = LlamaConfig(
        vocab_size=vocab,
        **SHAPE,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        if like is not None:
            model = LlamaForCausalLM.from_pretrained(like).eval()
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise * p.std())
        else:
            model.lm_head.weight.normal_(0.0, sharpness / cfg.hidden_size**0.5)
            model.lm_head.weight[tok.eos_token_id] = 0.0  # EOS rare: answers run to max_tokens
    model.generation_config.eos_token_id = tok.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_arch(model_type: str, vocab: int, head_scale: float | None = None, **extra: object):  # type: ignore[no-untyped-def]
    """A tiny model of a transformers architecture (random weights, seed 3), as a
    :class:`~picospec.runtime.model.LanguageModel`: 2 layers, 4 heads (2 key/value heads),
    hidden size 32, unless ``extra`` says otherwise. ``head_scale``: the LM head's weights drawn
    with that standard deviation times ``32**-0.5`` (sharper next-token distributions)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from picospec.runtime.model import LanguageModel

    torch.manual_seed(3)
    fields = {"vocab_size": vocab, **SHAPE, "max_position_embeddings": 256}
    cfg = AutoConfig.for_model(model_type, **(fields | extra))
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if head_scale is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, head_scale / 32**0.5)
    return LanguageModel(model=model, name=f"tiny-{model_type}")
