"""A small real server of the weather API contract (see ``resources.weather``), for demos and tests.

It serves the package's ``weather.csv`` with every value as its text from the file (null for
``NA``), so a month read through it equals the file source row for row.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import polars as pl

from resources.files import parse_month
from resources.package_data import NULL_VALUES, package_file

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 5000
MAX_PAGE_SIZE = 50_000


class WeatherApiServer(ThreadingHTTPServer):
    """Holds the month-indexed records and the expected token for its handlers."""

    def __init__(self, address: tuple[str, int], token: str = "") -> None:
        weather = pl.read_csv(
            package_file("weather.csv"), infer_schema=False, null_values=NULL_VALUES
        )
        # Indexed once at start: each request then only slices a list.
        self.months: dict[tuple[int, int], list[dict[str, str | None]]] = {
            (int(year), int(month)): part.to_dicts()
            for (year, month), part in weather.partition_by(["year", "month"], as_dict=True).items()
        }
        self.token = token
        super().__init__(address, _WeatherHandler)


class _WeatherHandler(BaseHTTPRequestHandler):
    server: WeatherApiServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path.rstrip("/") != "/weather":
            return self._send(404, {"error": f"no such path: {url.path}"})
        token = self.server.token
        if token and not hmac.compare_digest(
            self.headers.get("Authorization", "").encode(), f"Bearer {token}".encode()
        ):
            return self._send(401, {"error": "missing or wrong bearer token"})
        query = parse_qs(url.query)
        try:
            year_month = parse_month(query.get("month", [""])[0])
            page = int(query.get("page", ["1"])[0])
            page_size = int(query.get("page_size", [str(DEFAULT_PAGE_SIZE)])[0])
            if page < 1 or not 1 <= page_size <= MAX_PAGE_SIZE:
                raise ValueError(f"page must be >= 1 and page_size in 1..{MAX_PAGE_SIZE}")
        except ValueError as exc:
            return self._send(400, {"error": str(exc)})
        rows = self.server.months.get(year_month, [])
        start = (page - 1) * page_size
        next_page = page + 1 if start + page_size < len(rows) else None
        return self._send(
            200, {"records": rows[start : start + page_size], "page": page, "next_page": next_page}
        )

    def _send(self, status: int, payload: dict[str, object]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # The stdlib writes every request to stderr; route it to logging instead.
        logger.debug("%s - " + format, self.address_string(), *args)


def serve_weather_api(
    host: str = "127.0.0.1", port: int = 0, *, token: str = ""
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start the API in a daemon thread; stop with ``server.shutdown()`` + ``server_close()``."""
    server = WeatherApiServer((host, port), token=token)
    thread = threading.Thread(target=server.serve_forever, name="weather-api", daemon=True)
    thread.start()
    return server, thread
