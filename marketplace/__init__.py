"""What people run, one sub-package per role: the gateway, the client SDK, the provider node, the local devnet,
and the `strata` command line over them."""
