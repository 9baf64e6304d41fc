"""Media plumbing of the server: decoding, resampling, encoding (PyAV). Torch-free."""
