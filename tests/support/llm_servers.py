"""Real HTTP servers on 127.0.0.1 that speak the wire formats our generators use, driven by a script:
OpenAI chat completions and the Bedrock Converse API. They record every request they receive."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def reply_for(prompt: str) -> dict:
    """A valid reply to one of our prompts: a caption, or as many document segments as the prompt lists."""
    level = int(re.search(r"Target quality level: (\d)", prompt).group(1))
    segments = re.findall(r"^\[(\d+)\] ", prompt, flags=re.M)
    if segments:
        return {"texts": [f"synthetic level {level} segment {i}" for i in range(len(segments))]}
    return {"caption": f"synthetic level {level} caption"}


class _JSONHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class _Server:
    def __init__(self, script, delay_s: float = 0.0):
        """`script(key, attempt, prompt)` -> ("ok" | "throttle" | "error" | "malformed", extra); `key` names the
        request (origin and level), `attempt` counts from 1 per key."""
        self.script = script
        self.delay_s = delay_s
        self.attempts: dict[str, int] = defaultdict(int)
        self.log: list[tuple[str, str]] = []  # (key, outcome)
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        handler = self._handler()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def decide(self, key: str, prompt: str, body: dict) -> str:
        with self.lock:
            self.attempts[key] += 1
            outcome = self.script(key, self.attempts[key], prompt)
            self.log.append((key, outcome))
            self.bodies.append(body)
        if self.delay_s:
            time.sleep(self.delay_s)
        return outcome

    def ok_count(self, key: str) -> int:
        return sum(1 for k, o in self.log if k == key and o == "ok")


class FakeOpenAI(_Server):
    def _handler(self):
        server = self

        class Handler(_JSONHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][1]["content"][0]["text"]
                outcome = server.decide(self.headers.get("X-Request-Id", "?"), prompt, body)
                if outcome == "throttle":
                    return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
                if outcome == "error":
                    return self._send(500, {"error": {"message": "internal error"}})
                content = "I cannot comply {not json" if outcome == "malformed" else json.dumps(reply_for(prompt))
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}})

        return Handler


class FakeBedrock(_Server):
    """POST /model/{modelId}/converse, JSON in and out (botocore's rest-json protocol)."""

    def _handler(self):
        server = self

        class Handler(_JSONHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                blocks = body["messages"][0]["content"]
                prompt = blocks[0]["text"]
                origin = re.search(r"alt-text, which may be noisy, is:\n(.*)\n", prompt)
                level = re.search(r"level: (\d)", prompt).group(1)
                key = f"{origin.group(1) if origin else prompt[-60:]}|{level}"
                outcome = server.decide(key, prompt, body)
                if outcome == "throttle":
                    return self._send(429, {"message": "Too many requests, please wait before trying again."},
                                      {"x-amzn-ErrorType": "ThrottlingException:http://internal.amazon.com/coral/"})
                if outcome == "error":
                    return self._send(500, {"message": "internal"},
                                      {"x-amzn-ErrorType": "InternalServerException:http://internal.amazon.com/"})
                text = "not json at all" if outcome == "malformed" else json.dumps(reply_for(prompt))
                self._send(200, {"output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                                 "stopReason": "end_turn",
                                 "usage": {"inputTokens": 200, "outputTokens": 30, "totalTokens": 230},
                                 "metrics": {"latencyMs": 5}})

        return Handler
