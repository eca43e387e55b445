"""The ingest service (`unlearnable serve`, docs/service.md): limits.py (token, bind rule, upload
checks; no Ray), uploads.py (several uploads in one PGD call; no Ray), metrics.py (Prometheus),
app.py (the Ray Serve deployment and its FastAPI routes)."""
