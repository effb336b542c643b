"""The admin API: health, readiness, metrics (and later keys, tenants, analytics)."""
