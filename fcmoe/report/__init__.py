"""Reporting: the end-of-run table, figures, and the sweep report (tables, figures, report.md / .html)."""
