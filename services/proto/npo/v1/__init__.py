"""Generated stubs of the proto package npo.v1 (scripts/gen_protos.py); do not edit."""
