"""Per-checkpoint worker: checkpoint sources, CRIU image reader, namespace builders, pools."""
