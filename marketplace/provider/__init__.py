"""The provider node: a shard of a model behind a hop server, with the keys that sign its receipts, the
gateways and validators it trusts, and the announcer that keeps its ask on a gateway's book
(:class:`~marketplace.provider.node.ProviderNode`); its settings; and bonding stake on chain."""
