"""I/O: params.yaml and typed settings, the artifact-path table, atomic writes and the HDF5
map store, sharded outputs."""
