#!/usr/bin/env python3
"""A leasehold client in Python's standard library only: http.client over AF_UNIX.

Acquires a resource, makes a second process wait for it (reading the "waiting" lines as they
come), watches the events, and releases. Usage: http_client.py SOCKET
"""

import http.client
import json
import socket
import subprocess
import sys


class Agent(http.client.HTTPConnection):
    """An HTTP connection to the agent's Unix socket."""

    def __init__(self, path):
        super().__init__("leasehold", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def call(path, method, url, body=None):
    """One request; the status and the JSON answer."""
    c = Agent(path)
    c.request(method, url, body=json.dumps(body) if body is not None else None,
              headers={"content-type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read())


def stream(path, url, body):
    """A streaming request; its response, whose lines are read as they come."""
    c = Agent(path)
    c.request("POST", url, body=json.dumps(body), headers={"content-type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, (r.status, r.read())
    return r


def next_line(r):
    return json.loads(r.readline())


def main():
    sock = sys.argv[1]
    me = subprocess.Popen(["sleep", "600"])
    other = subprocess.Popen(["sleep", "600"])
    try:
        # Watching from the moment the answer's headers arrive.
        events = stream(sock, "/v1/watch", {"resource": "py-disk"})
        r = stream(sock, "/v1/acquire",
                   {"items": [{"resource": "py-disk", "mode": "exclusive"}], "pid": me.pid,
                    "label": "python"})
        granted = next_line(r)
        assert granted["event"] == "granted", granted
        token = granted["grants"][0]["token"]
        print("granted token", token)

        waiter = stream(sock, "/v1/acquire",
                        {"items": [{"resource": "py-disk", "mode": "exclusive"}],
                         "pid": other.pid, "wait": "5m"})
        line = next_line(waiter)
        assert line["event"] == "waiting", line
        assert f"pid {me.pid}" in line["message"], line
        print(line["message"])

        status, released = call(sock, "POST", "/v1/release",
                                {"resources": ["py-disk"], "pid": me.pid})
        assert status == 200 and released["released"][0]["resource"] == "py-disk", released
        line = next_line(waiter)
        while line["event"] == "waiting":
            line = next_line(waiter)
        assert line["event"] == "granted", line
        assert line["grants"][0]["token"] > token, line
        print("the waiter got token", line["grants"][0]["token"])

        kinds = [next_line(events)["kind"] for _ in range(3)]
        assert kinds == ["granted", "released", "granted"], kinds
        print("watched", kinds)

        status, answer = call(sock, "POST", "/v1/release",
                              {"resources": ["py-disk"], "pid": other.pid})
        assert status == 200, answer
        status, answer = call(sock, "POST", "/v1/release",
                              {"resources": ["py-disk"], "pid": other.pid, "bogus": 1})
        assert status == 400 and answer["code"] == "usage", answer
        print("all done")
    finally:
        me.kill()
        other.kill()


if __name__ == "__main__":
    main()
