"""Generated stubs of the proto package npo (scripts/gen_protos.py)."""
