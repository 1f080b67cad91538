"""The emulated geo-distributed testbed (``bprr testbed``): network namespaces per site, a
delaying relay on the path, real random-weight block servers, clients relaying activations."""
