"""PNG and HTML reports (matplotlib, Agg backend)."""
