"""Pure-torch model-patching mechanics, one module per method; testable without the node layer."""
