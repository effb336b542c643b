"""One small module per decision; each check is `decide(ctx) -> Decision` (see base.Check)."""
