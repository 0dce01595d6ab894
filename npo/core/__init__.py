"""The method, pure: torch and the standard library only (no runtime, no transport)."""
