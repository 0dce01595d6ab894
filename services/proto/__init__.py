"""Generated gRPC stubs of proto/ (scripts/gen_protos.py); import services.proto.npo.v1."""
