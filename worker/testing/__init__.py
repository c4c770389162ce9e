"""Test material that never runs in a provider serving for real: small deterministic checkpoints built locally
(:mod:`.tiny`) and shards that cheat (:mod:`.cheats`). Nothing in the provider node imports it; the test suite,
the benchmarks, `strata model tiny` and the devnet's cheating providers do."""
