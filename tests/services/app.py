"""The app of the services tests: keeps rows in Postgres and counts hits in
Redis, both reached by their service names on the deployment's network."""

import json
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg2
import redis

DATABASE = os.environ.get("DATABASE", "host=db user=postgres dbname=postgres connect_timeout=5")
CACHE = os.environ.get("CACHE", "cache")


def db():
    conn = psycopg2.connect(DATABASE)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text NOT NULL)")
    return conn


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/":
            return self.reply(200, {"app": os.environ.get("APP_ID", ""), "host": socket.gethostname()})
        if self.path == "/notes":
            conn = db()
            with conn.cursor() as cur:
                cur.execute("SELECT body FROM notes ORDER BY id")
                rows = [r[0] for r in cur.fetchall()]
            conn.close()
            hits = redis.Redis(host=CACHE, port=6379, socket_timeout=5).incr("hits")
            return self.reply(200, {"notes": rows, "hits": hits, "app": os.environ.get("APP_ID", "")})
        self.reply(404, {"error": "not found"})

    def do_POST(self):
        if self.path != "/notes":
            return self.reply(404, {"error": "not found"})
        body = self.rfile.read(int(self.headers.get("content-length", "0"))).decode()
        conn = db()
        with conn.cursor() as cur:
            cur.execute("INSERT INTO notes (body) VALUES (%s)", (body,))
            cur.execute("SELECT count(*) FROM notes")
            count = cur.fetchone()[0]
        conn.close()
        self.reply(201, {"count": count})

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", 8000), Handler).serve_forever()
