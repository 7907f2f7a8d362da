"""The image's HEALTHCHECK: GET /healthz on the port CARGOHOLD_LISTEN names (the image has no curl)."""
import os
import ssl
import sys
import urllib.request

port = os.environ.get("CARGOHOLD_LISTEN", "0.0.0.0:5000").rpartition(":")[2]
scheme = "https" if os.environ.get("CARGOHOLD_TLS_CERT") else "http"
context = ssl._create_unverified_context() if scheme == "https" else None   # our own loopback
try:
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/healthz", timeout=4, context=context) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except OSError:
    sys.exit(1)
