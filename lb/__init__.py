"""inference-balancer: the asyncio reverse proxy that makes N workers one OpenAI-compatible endpoint."""
