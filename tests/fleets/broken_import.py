"""A fleet module whose import raises: a configuration error, not a crash loop."""

fleet = {"w": print}
raise RuntimeError("database URL is not set")
