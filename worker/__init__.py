"""The provider node: shard loading, runtime, wire format, hop server and receipts."""
