"""Network <-> sessions: aiohttp + aiortc + PyAV. Never imports torch (the engine is reached only
through `engine.api` and the engine factory)."""
