"""Inference engines other than the embedded runtime (transformers and slot caches).

Large targets, which need several GPUs, run on an existing distributed engine, never on one
PicoSpec writes itself. :mod:`~picospec.engines.vllm_env` holds what running vLLM needs:
finding an interpreter that has it, preparing its virtual environment, exporting a model to a
directory it loads, and serving a model with vLLM's own OpenAI server (the baseline users
compare against).
"""
