"""Test material for settlement: jobs recorded as a gateway records them. No production path imports it."""
