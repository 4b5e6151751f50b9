"""Storage: the .h5 artifact container and how compact keys/values are encoded in it."""
