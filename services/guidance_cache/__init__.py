"""The guidance cache role: guides and the mistake pool on a Redis-protocol server.

- `store.RedisGuideStore`: npo.runtime.store.GuideStore through redis-py (production Redis or the embedded server).
- `embedded.EmbeddedRedis`: a private valkey-server child process for the embedded runtime and tests.
"""
