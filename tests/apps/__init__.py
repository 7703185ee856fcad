"""Small real applications that the multi-process tests serve with gunicorn."""
