"""`grpokit vllm-serve MODEL`: one vLLM engine behind HTTP, what a run with `vllm_mode: server` samples from.

The trainer (`rollout.vllm.ServerEngine`) speaks three calls, each answered with JSON:
- `GET /health`: the model, its context and vocabulary (the trainer checks the vocabulary against its policy's);
- `POST /generate` `{"requests": [...]}` (`rollout.vllm.engine_requests`): each request's completions, token ids
  in and out (never re-tokenized), with the sampled tokens' logprobs and the finish reasons;
- `POST /update_weights`, a safetensors body: the policy's whole weights, loaded by vLLM's `reload_weights`, then
  the prefix cache dropped.
Requests are served one at a time (the engine batches inside a call). A request vLLM would refuse is refused here
first (`check_requests`: a refused request hung the in-process engine when probed); an engine that raised is not
used again (every later call answers 503: restart the server).
"""

from __future__ import annotations

import json
import socket
import sys
import traceback
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from grpokit.rollout.vllm import EngineSettings, LocalEngine, check_requests, shape_mismatch, state_from_bytes

MAX_BODY = 64 * 2**30  # a weight push of a 14B model in bfloat16 fits


class EngineServer(HTTPServer):
    """An HTTP server holding one `LocalEngine` (its `failed` reason once it raised), the names and shapes of the
    checkpoint it loaded (pushes are checked against them before they reach the engine), and the token of the last
    weights pushed (a generation names the token of the weights it expects)."""

    def __init__(self, address: tuple[str, int], engine: LocalEngine, model: str):
        self.engine, self.model, self.failed = engine, model, None
        self.shapes, self.weights_token = checkpoint_shapes(model), None
        super().__init__(address, EngineHandler)


def checkpoint_shapes(model: str) -> dict[str, list[int]] | None:
    """name -> shape of every tensor in a model folder's safetensors files (read from their headers); None for a hub
    id or a folder without them."""
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(model).glob("*.safetensors")) if Path(model).is_dir() else []
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                shapes[name] = list(f.get_slice(name).get_shape())
    return shapes or None


class EngineHandler(BaseHTTPRequestHandler):
    server: EngineServer

    def log_message(self, format: str, *args: Any) -> None:  # one line per call, on stderr
        sys.stderr.write(f"grpokit vllm-serve: {self.command} {self.path} -> {args[1] if len(args) > 1 else ''}\n")

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._answer(404, {"error": f"no {self.path}: GET /health, POST /generate, POST /update_weights"})
        engine = self.server.engine
        if self.server.failed is not None:
            return self._answer(503, {"error": f"the engine failed earlier ({self.server.failed}); restart the server"})
        return self._answer(200, {
            "model": self.server.model, "max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size,
            "vllm": getattr(sys.modules.get("vllm"), "__version__", None), "shapes": self.server.shapes,
        })  # fmt: skip

    def do_POST(self) -> None:
        if self.path not in ("/generate", "/update_weights"):
            return self._answer(404, {"error": f"no {self.path}: POST /generate or /update_weights"})
        if self.server.failed is not None:
            return self._answer(503, {"error": f"the engine failed earlier ({self.server.failed}); restart the server"})
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            return self._answer(400, {"error": f"a body of {length} bytes: expected 1 to {MAX_BODY}"})
        body = self.rfile.read(length)
        engine, server = self.server.engine, self.server
        try:  # what the caller sent wrong: 400 (or 409), the engine untouched and still usable
            if self.path == "/generate":
                payload = json.loads(body)
                requests = payload["requests"]
                check_requests(requests, max_model_len=engine.max_model_len, vocab_size=engine.vocab_size,
                               context_field="the server's --max-model-length")  # fmt: skip
                if payload.get("weights_token") != server.weights_token:
                    return self._answer(409, {"error": (
                        "this server holds other weights than the run's last push (another run pushed its weights "
                        "since, or the server restarted): one server serves one run at a time"
                    )})  # fmt: skip
            else:
                state = state_from_bytes(body)
                wrong = shape_mismatch(server.shapes, state)
                if wrong is not None:
                    return self._answer(400, {"error": (
                        f"these weights are not the served model's ({server.model}): {wrong}; start the server with "
                        "the run's starting model"
                    )})  # fmt: skip
        except Exception as err:
            return self._answer(400, {"error": f"{type(err).__name__}: {err}"})
        try:
            if self.path == "/generate":
                answer = {"completions": [[c.__dict__ for c in group] for group in engine.complete(requests)]}
            else:
                engine.load_weights(state.items())
                server.weights_token = self.headers.get("X-Weights-Token")
                answer = {"tensors": len(state)}
        except Exception as err:  # the engine itself failed: not trusted again
            server.failed = f"{self.path}: {type(err).__name__}: {err}"
            traceback.print_exc()
            return self._answer(500, {"error": server.failed})
        try:
            self._answer(200, answer)
        except OSError as err:  # the caller went away (its timeout, a killed run): the engine is fine
            sys.stderr.write(f"grpokit vllm-serve: the caller of {self.path} went away before the answer ({err})\n")


def serve(settings: EngineSettings, *, host: str, port: int) -> None:
    """Load the engine, then answer on host:port until interrupted (the model loads before the port opens, so a
    trainer's health check answered means ready; whether the port is free is checked before the load)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ValueError(f"cannot listen on {host}:{port}: {err.strerror} (--host, --port)") from None
    engine = LocalEngine(settings)
    server = EngineServer((host, port), engine, settings.model)
    print(f"grpokit vllm-serve: {settings.model} ready on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
