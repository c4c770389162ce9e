"""Test material for whole marketplaces and routes: provider processes with a gateway's side of the hop
protocol, and the protocol's adversaries. No production path imports it."""
