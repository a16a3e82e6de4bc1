"""Data: readers with validation, the built-in demo corpus, and (later) token caches and packing."""
