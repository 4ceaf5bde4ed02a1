"""Op wrappers: validate, pick the kernel variant, fill the params struct, dispatch."""
