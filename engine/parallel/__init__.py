"""Timestep-forcing pipeline parallelism across a GPU group (docs/parallel.md has the whole
design). Importing this package imports nothing: `engine.parallel.layout` is torch-free."""
