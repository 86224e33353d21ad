"""The model runtime: loading models, running their forwards, scheduling them, pacing them.

Layer 1 of 5 (protocol, **runtime**, speculation, services, tools). It may import
:mod:`picospec.protocol` and nothing above; it knows nothing of drafting or verifying.

- :mod:`~picospec.runtime.loading`: :func:`~picospec.runtime.loading.load_model`, the one way
  to get a model by name, and :func:`~picospec.runtime.loading.model_from_settings`.
- :mod:`~picospec.runtime.checkpoints`: where weights come from (the embedded SmolLM2, GGUF,
  directories, the hub cache), device, precision, int8.
- :mod:`~picospec.runtime.drafts`: distilled drafts (the registry of names, the file, the
  student model, the shipped ``smollm2-draft``). **A new draft model goes here.**
- :mod:`~picospec.runtime.model`: :class:`~picospec.runtime.model.LanguageModel` and
  :class:`~picospec.runtime.model.KVCache`: forwards of one session or many.
- :mod:`~picospec.runtime.kvslots`: slot caches, the varlen forward, packed weights;
  :mod:`~picospec.runtime.architecture`: which decoders run batched.
- :mod:`~picospec.runtime.scheduler`: the model thread's continuous batching of programs.
- :mod:`~picospec.runtime.devices`: device profiles (emulated hardware) and their pacing.
- :mod:`~picospec.runtime.vllm_engine`, :mod:`~picospec.runtime.vllm_env`: the target on vLLM's
  engine, and vLLM's environment.
- :mod:`~picospec.runtime.text`: stop strings and incremental detokenisation.
"""
