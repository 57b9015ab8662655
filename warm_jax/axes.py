"""The device mesh's axis names (no JAX import: command lines name a flag per axis)."""
MESH_AXES = ("ensemble", "data", "fsdp", "tensor")
