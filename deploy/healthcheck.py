"""Container health probe: GET ``MLOPS_HEALTHCHECK_URL`` (default the Dagster webserver).

Exit 0 on a 2xx answer, 1 otherwise (Docker's HEALTHCHECK contract). Standard library only, so
it costs no import time.
"""

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:3000/server_info"


def main() -> int:
    url = os.environ.get("MLOPS_HEALTHCHECK_URL") or DEFAULT_URL
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if 200 <= response.status < 300 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"{url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
