"""shieldproxy: an API security and analytics gateway (asyncio reverse proxy)."""

__version__ = "0.1.0"
