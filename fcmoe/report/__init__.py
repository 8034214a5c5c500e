"""Reporting: tables now; plots and HTML reports come with the sweep command."""
