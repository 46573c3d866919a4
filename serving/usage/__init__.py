"""Usage records: one per request, written as JSON lines, read back and reported on (billing, audit)."""
