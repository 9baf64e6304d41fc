"""Audio in -> frames out. The GPU/CPU side of the avatar server.

Importing `engine` is cheap and torch-free; torch is imported only by the modules that need it
(`engine.models`, `engine.checkpoint`, the generator) and by the engine factory at run time.
"""
