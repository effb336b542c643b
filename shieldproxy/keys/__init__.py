"""API keys: format, hashing at rest, records, and the cached registry the hot path reads."""
