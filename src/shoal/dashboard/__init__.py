"""The browser dashboard: static HTML, CSS and JS modules, served by api/dashboard.py."""
