"""Prometheus text-format metrics of one node (no client library: a few counters and gauges)."""

from __future__ import annotations

from collections import Counter
from typing import Callable


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.bytes_out = 0
        self.bytes_in = 0
        self.request_seconds: Counter[str] = Counter()
        self._gauges: list[tuple[str, str, Callable[[], list[tuple[dict, float]]]]] = []

    def observe(self, route: str, method: str, status: int, seconds: float, sent: int) -> None:
        self.requests[(route, method, status)] += 1
        self.request_seconds[route] += seconds
        self.bytes_out += sent

    def gauge(self, name: str, help_text: str, read: Callable[[], list[tuple[dict, float]]]) -> None:
        """Register a value computed at scrape time: `read()` returns (labels, value) pairs."""
        self._gauges.append((name, help_text, read))

    def render(self) -> bytes:
        lines = ["# HELP cargohold_http_requests_total HTTP requests by route, method and status.",
                 "# TYPE cargohold_http_requests_total counter"]
        for (route, method, status), count in sorted(self.requests.items()):
            lines.append(f'cargohold_http_requests_total{{route="{route}",method="{method}",status="{status}"}} {count}')
        lines += ["# HELP cargohold_http_request_seconds_total Time spent answering requests, by route.",
                  "# TYPE cargohold_http_request_seconds_total counter"]
        for route, seconds in sorted(self.request_seconds.items()):
            lines.append(f'cargohold_http_request_seconds_total{{route="{route}"}} {seconds:.6f}')
        lines += ["# HELP cargohold_http_bytes_sent_total Response body bytes sent.",
                  "# TYPE cargohold_http_bytes_sent_total counter",
                  f"cargohold_http_bytes_sent_total {self.bytes_out}",
                  "# HELP cargohold_http_bytes_received_total Request body bytes received for blobs and manifests.",
                  "# TYPE cargohold_http_bytes_received_total counter",
                  f"cargohold_http_bytes_received_total {self.bytes_in}"]
        for name, help_text, read in self._gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for labels, value in read():
                rendered = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}")
        return ("\n".join(lines) + "\n").encode()
