#!/usr/bin/env python3
"""A webhook receiver for Pipes' tests, as a user would write one.

Checks every delivery's X-Pipes-Signature with Python's own hmac module
and appends one JSON line per request to OUT: path, event, delivery id,
whether the signature holds, and the body. Paths decide the answer:
/flaky answers 500 to the first two tries of each delivery, then 200;
/hang records the request, then never answers; anything else answers 200.

Usage: receiver.py PORT SECRET OUT
"""
import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, SECRET, OUT = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
tries = {}
lock = threading.Lock()


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        valid = hmac.compare_digest(expected, self.headers.get("X-Pipes-Signature", ""))
        delivery = self.headers.get("X-Pipes-Delivery", "")
        with lock:
            key = (self.path, delivery)
            tries[key] = tries.get(key, 0) + 1
            seen = tries[key]
            with open(OUT, "a") as out:
                out.write(json.dumps({
                    "path": self.path,
                    "event": self.headers.get("X-Pipes-Event"),
                    "delivery": delivery,
                    "valid": valid,
                    "body": json.loads(body) if valid else None,
                }) + "\n")
        if self.path == "/hang":
            time.sleep(3600)
        status = 500 if self.path == "/flaky" and seen <= 2 else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Receiver).serve_forever()
