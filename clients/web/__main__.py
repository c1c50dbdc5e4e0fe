"""Open the live caption page that the agent serves at / (fed by its /events WebSocket).

Waits (retrying with backoff) until the agent answers, then prints the page's URL, with the
token in it when one is given, and opens it in a browser with --open. The page itself is
static (served by the agent from agent/protocols/web/) and can also be opened against another
agent:
http://AGENT:8765/?agent=ws://OTHER:8765&token=TOKEN&stream=ID.

Example: python -m clients.web --agent http://127.0.0.1:8765 --open
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from urllib.parse import urlencode, urlsplit, urlunsplit

from clients.common import TOKEN_ENV, Backoff, say

PROG = "web"


def page_url(agent: str, token: str | None, stream: str | None) -> str:
    """The caption page's URL on an agent given as http(s):// or ws(s)://HOST:PORT."""
    parts = urlsplit(agent if "://" in agent else f"http://{agent}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    query = {k: v for k, v in (("token", token), ("stream", stream)) if v}
    return urlunsplit((scheme, parts.netloc, "/", urlencode(query), ""))


def wait_for_page(url: str, attempts: int) -> bool:
    """True once ``GET url`` answers 200; retries with capped backoff, ``attempts`` times."""
    backoff = Backoff()
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url.split("?")[0], timeout=5) as response:
                if response.status == 200:
                    return True
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code} (is this a salmonn-live agent with the page?)"
        except (urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc))
        if attempt == attempts:
            say(PROG, f"agent {url.split('?')[0]} unreachable: {reason}; giving up")
            return False
        delay = backoff.next()
        say(PROG, f"agent {url.split('?')[0]} unreachable: {reason}; retrying in {delay:.1f} s")
        time.sleep(delay)
    return False


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m clients.web",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--agent", default="http://127.0.0.1:8765", metavar="URL", help="the agent's address"
    )
    parser.add_argument(
        "--token", help=f"the agent's token (default: ${TOKEN_ENV}); it goes into the page URL"
    )
    parser.add_argument("--stream", help="show only this stream at first")
    parser.add_argument("--open", action="store_true", help="open the page in a browser")
    parser.add_argument("--attempts", type=int, default=8, help="connection attempts")
    args = parser.parse_args(argv)
    url = page_url(args.agent, args.token or os.environ.get(TOKEN_ENV), args.stream)
    if not wait_for_page(url, max(1, args.attempts)):
        return 1
    print(url)
    if args.open:
        webbrowser.open(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
