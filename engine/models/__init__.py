"""Model definitions: one model per file, config dataclasses, shape comments."""
