"""The front of `serve --follow` (tasks/serving/front.py) with two real HTTP servers on loopback: a switch
while a client keeps asking loses no request, new connections reach the new server, a request in flight
on the old one finishes there, and `drain` tells when the old one may stop."""
from __future__ import annotations

import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from qlora_ops.tasks.serving.front import Front, free_port


def backend(name: str, delay: float = 0.0) -> ThreadingHTTPServer:
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(delay if self.path == "/slow" else 0)
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return r.read().decode()


def test_a_switch_loses_no_request_and_the_old_server_finishes_what_it_took():
    a, b = backend("a", delay=1.5), backend("b")
    port = free_port()
    with Front("127.0.0.1", port) as front:
        url = f"http://127.0.0.1:{port}"
        front.switch(("127.0.0.1", a.server_address[1]))
        answers, errors, done = [], [], threading.Event()

        def ask():
            while not done.is_set():
                try:
                    answers.append(get(f"{url}/ping"))
                except OSError as e:
                    errors.append(e)
        client = threading.Thread(target=ask)
        client.start()
        slow: list[str] = []
        in_flight = threading.Thread(target=lambda: slow.append(get(f"{url}/slow")))
        in_flight.start()
        time.sleep(0.5)
        old = front.switch(("127.0.0.1", b.server_address[1]))
        assert old == ("127.0.0.1", a.server_address[1])
        assert not front.drain(old, timeout=0.2)  # the slow request is still on `a`
        assert front.drain(old, timeout=30)
        in_flight.join(timeout=30)
        a.shutdown()  # the old version stops: nothing the client asks reaches it any more
        time.sleep(0.5)
        done.set()
        client.join(timeout=30)
    assert slow == ["a"] and not errors
    assert answers[0] == "a" and answers[-1] == "b" and answers.count("b") > 3
    b.shutdown()
