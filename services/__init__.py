"""Production adapters around the `npo` core: Redis guidance cache, gRPC services, engines, CLI.

Each role lives in its own subpackage; import the module you need (package `__init__` files import nothing heavy).
"""
