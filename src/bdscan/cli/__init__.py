"""The command-line interface: thin wrappers from arguments to a library call and a render."""
