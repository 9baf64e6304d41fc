"""The engine's speed paths, each a config switch of `[engine]` with a plain-path value.

- `fp8`: FP8 linears (`engine.models.fp8`), quantised once when the engine starts;
- `attention_backend`: the SDPA backend, probed at start-up for the session shapes (`attention`);
- `compile`: torch.compile of the fixed-shape DiT layer (`compile`);
- `vae_overlap`: VAE decode on a second CUDA stream, overlapping the next block (`engine.decode`);
- `avatar_cache_mb`: per-avatar reuse of the reference encode and the sink (`engine.avatar_cache`).

`prepare` applies the model-changing ones to a loaded model set; `avatar bench --baseline`
measures against `EngineConfig.plain()`, which turns every one of them off.
"""
