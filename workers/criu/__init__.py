"""Reader for CRIU image files (protobuf entries framed as CRIU writes them)."""
