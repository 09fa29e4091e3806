"""The HTTP layer: servers over the library (only cli/ imports it)."""
