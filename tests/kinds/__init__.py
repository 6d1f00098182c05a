"""Source kinds that exist only in the test suite (registered by the tests that use them)."""
