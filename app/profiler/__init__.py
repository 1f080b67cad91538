"""The block profiler (``bprr profile``): measured decode and prefill speeds per block.

``fit`` and ``arch`` are pure (numpy only); ``blocks`` and ``measure`` need torch (the
``profile`` extra); ``profile`` runs and caches profiles for the server agent
(``measured_speeds``) and imports torch only when it measures.
"""
