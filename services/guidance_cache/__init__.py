"""The guidance cache role: guides and the mistake pool on a Redis-protocol server, behind gRPC
(npo.v1.GuidanceCacheService).

- `store.RedisGuideStore`: npo.runtime.store.GuideStore through redis-py (production Redis or the embedded server).
- `embedded.EmbeddedRedis`: a private valkey-server child process for the embedded runtime and tests.
- `server.GuidanceCacheServicer` / `server.serve` / `server.main`: the service over a store, and
  `python -m services.guidance_cache`.
- `client.GuidanceCacheClient`: a GuideStore calling the service.
"""
