"""One small module per decision; each check is `async def decide(ctx) -> Decision`."""
