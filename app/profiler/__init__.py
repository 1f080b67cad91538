"""The block profiler (``bprr profile``): measured decode and prefill speeds per block.

``fit`` and ``arch`` are pure (numpy only); ``blocks`` and ``measure`` need torch (the
``profile`` extra); ``hf`` builds the blocks of any Hugging Face ``config.json`` with
transformers (optionally int8/NF4 through bitsandbytes); ``profile`` runs and caches profiles
for the server agent (``measured_speeds``) and imports torch only when it measures.
"""
