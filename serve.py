"""Serve a model over HTTP in OpenAI's API shapes, with a chat page to talk to it in a browser.

    python serve.py --checkpoint runs/mychat/scratch-sft.pth     # then open http://127.0.0.1:8000/
    python serve.py --init gpt2 --port 8080 --api_key secret      # a pretrained model: POST /v1/completions
    curl 127.0.0.1:8000/v1/chat/completions \\
        -d '{"model": "scratch-sft", "messages": [{"role": "user", "content": "Hi"}]}'

Routes: GET / (the page, chat.html), GET /v1/models, POST /v1/chat/completions (a chat model: its messages go through
the prompt template generate.py --chat uses), POST /v1/completions (plain continuation; any model). Requests take
temperature, top_p, top_k, max_tokens, stop, seed and stream (server-sent events ending with `data: [DONE]`); each
answer has usage counts and a finish_reason (stop or length). Requests are served one at a time, in the order the
model lock gives them, each with the KV cache of the one before (a conversation's earlier turns are not recomputed);
a client that goes away stops its generation. Errors are OpenAI's error JSON: 400 bad JSON or fields, 401 wrong key,
404 unknown route or model, 411/413 missing or too large a body, 400 context_length_exceeded.
"""
import http.server
import ipaddress
import json
import os
import select
import socket
import sys
import threading
import time
import uuid

import torch

from checkpoints import init_model
from data import EOT_ID, get_tokenizer
from files import parse_json
from model import KVCache, count_parameters
from replies import Reply, chat_prompt
from settings import UserError, autocast, describe_device, entry, get_config, pick_device, pick_dtype

DEFAULTS = dict(
    checkpoint="runs/chat/gpt2-medium355M-sft.pth",  # the model to serve (finetune_chat.py writes it)
    init="",                   # gpt2 | gpt2-medium | gpt2-large | gpt2-xl | PATH: serve this instead of --checkpoint
    model_name="",             # the model id the API lists and requests name; "" = the checkpoint's file name
    host="127.0.0.1",          # address to listen on; one that is not local lets other machines in
    port=8000,                 # TCP port; 0 = any free one (the start-up line names it)
    api_key="",                # require `Authorization: Bearer KEY` on the API (not on the page); "" = off
    max_tokens=256,            # new tokens of a request that sends no max_tokens (always capped by the context)
    top_k=50,                  # keep the k most likely tokens, for requests that send no top_k; 0 = off
    max_body=1 << 20,          # bytes a request body may hold; larger ones get 413
    seed=123,                  # seeds the sampling of requests that send no seed
    device="auto",             # auto | cpu | cuda | mps
    dtype="auto",              # auto | float32 | bfloat16 | float16
)

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def check_settings(cfg):
    if not 0 <= cfg["port"] < 65536:
        raise UserError(f"--port must be in 0..65535 (0 = any free port), got {cfg['port']}")
    if cfg["max_tokens"] < 1 or cfg["top_k"] < 0 or cfg["max_body"] < 1024:
        raise UserError("--max_tokens must be >= 1, --top_k >= 0 (0 = off) and --max_body >= 1024")


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------------
# The model and its lock
# ---------------------------------------------------------------------------------------------------------------

class Engine:
    """One served model: requests take its lock in turn and generate with its KV cache, one at a time."""

    def __init__(self, model, ckpt, name, cfg, device, dtype):
        self.model, self.name, self.cfg, self.device, self.dtype = model, name, cfg, device, dtype
        self.kind = ckpt.get("kind") or "pretrained"
        self.created = int(time.time())
        self.tokenizer = get_tokenizer()
        self.ctx = model.cfg["context_length"]
        self.cache = KVCache(model, 1, self.ctx)
        self.generator = torch.Generator(device=device).manual_seed(cfg["seed"])
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # set on Ctrl-C / SIGTERM: generations end at their next token
        self.last = None  # the latest Reply

    def run(self, prompt_ids, params, chat, gone):
        """Wait for the model, then yield the reply's text pieces as they are sampled; returns None if the client
        left first, else the finished Reply. gone() is asked while waiting and after every token."""
        while not self.lock.acquire(timeout=0.2):
            if gone():
                return None
        try:
            if gone():
                return None
            seed = params["seed"]
            gen = self.generator if seed is None else torch.Generator(device=self.device).manual_seed(seed)
            reply = Reply(self.model, torch.tensor([prompt_ids], device=self.device), params["max_tokens"],
                          params["temperature"], params["top_k"], params["top_p"], kv_cache=self.cache,
                          generator=gen, tokenizer=self.tokenizer, stop=params["stop"], chat=chat,
                          should_stop=lambda: self.stopping.is_set() or gone())
            self.last, start = reply, time.perf_counter()
            try:
                with autocast(self.device, self.dtype):
                    yield from reply
            finally:
                seconds = time.perf_counter() - start
                print(f"{self.name}: {len(prompt_ids)} prompt + {reply.n_tokens} new tokens in {seconds:.2f} s, "
                      f"{reply.finish_reason or 'stopped early (the client left or the server is stopping)'}",
                      file=sys.stderr)
            return reply
        finally:
            self.lock.release()


# ---------------------------------------------------------------------------------------------------------------
# Requests: fields checked as OpenAI checks them
# ---------------------------------------------------------------------------------------------------------------

def number(body, name, default, low, high, kind=float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or \
            not low <= value <= high:
        what = "a whole number" if kind is int else "a number"
        raise ApiError(400, f"{name} must be {what} from {low} to {high}, got {json.dumps(value)}", name)
    return kind(value)


def sampling_params(body, engine):
    """The generation settings of a request body, checked; max_tokens is not yet capped by the context."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", "stop")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: this server writes one answer per request", "n")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "stream must be true or false", "stream")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    return dict(temperature=number(body, "temperature", 1.0, 0, 2),
                top_p=number(body, "top_p", 1.0, 0, 1) or 1e-9,  # 0 keeps only the most likely token
                top_k=number(body, "top_k", engine.cfg["top_k"], 0, 1 << 30, int),
                max_tokens=number({"max_tokens": max_tokens}, "max_tokens", engine.cfg["max_tokens"], 1, 1 << 30,
                                  int),
                seed=number(body, "seed", None, -(1 << 63), (1 << 64) - 1, int), stop=stop,
                stream=body.get("stream", False), include_usage=bool(options.get("include_usage")))


def message_text(content, j):
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{j}].content must be text (a string, or a list of text parts)",
                   f"messages[{j}].content")


def chat_messages(body):
    """The request's messages as [{"role", "content"}], checked: an optional system (or developer) message first,
    then user and assistant turns alternating, ending with the user's."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out, expected = [], "user"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ApiError(400, f"messages[{j}] must be an object with a role and a content", f"messages[{j}]")
        role = "system" if m["role"] == "developer" else m["role"]
        if role == "system" and j == 0:
            out.append({"role": "system", "content": message_text(m.get("content"), j)})
            continue
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{j}].role must be system, user or assistant, got {json.dumps(m['role'])}",
                           f"messages[{j}].role")
        if role != expected:
            raise ApiError(400, f"messages[{j}] has role {role} where {expected} was expected: a system message may "
                           f"come first, then user and assistant turns alternate", f"messages[{j}].role")
        out.append({"role": role, "content": message_text(m.get("content"), j)})
        expected = "assistant" if role == "user" else "user"
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's: the model answers it", "messages")
    return out


def completion_prompt(body, tokenizer):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (or a list of one string)", "prompt")
    return tokenizer.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT_ID]  # nothing: a new document


def prompt_and_limit(body, engine, chat, params):
    """(prompt ids, new tokens allowed) of a request, or a 400 when the prompt does not fit the context. A chat's
    oldest exchanges are left out when the conversation outgrows the context, as generate.py --chat does."""
    if chat:
        ids, _ = chat_prompt(chat_messages(body), "", engine.ctx, params["max_tokens"], engine.tokenizer)
    else:
        ids = completion_prompt(body, engine.tokenizer)
    if len(ids) >= engine.ctx:
        raise ApiError(400, f"the prompt is {len(ids)} tokens, and this model's context is {engine.ctx}: shorten it "
                       f"(a chat's last message has to fit, with room for one new token)", "messages" if chat
                       else "prompt", "context_length_exceeded")
    return ids, min(params["max_tokens"], engine.ctx - len(ids))


# ---------------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    """The routes; the server holds the engine. One response per connection (HTTP/1.0), so a stream ends when
    the connection closes."""
    server_version = "gpt2-from-scratch"
    timeout = 60  # seconds a client may leave a request half-sent

    @property
    def engine(self):
        return self.server.engine

    def log_message(self, fmt, *args):
        print(f"{self.address_string()} {fmt % args}", file=sys.stderr)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (a malformed request line, a header too long) as error JSON."""
        self.close_connection = True
        self.send_json(code, ApiError(code, message or explain or "bad request").body())

    def send_json(self, status, obj):
        raw = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if status == 405:
            self.send_header("Allow", "POST")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        self.answer(self.post)

    def answer(self, route):
        try:
            route(self.path.split("?")[0])
        except ApiError as e:
            self.send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True  # the client left or stalled: nothing to answer
        except Exception as e:  # a bug: one line here, error JSON there, and the server goes on
            print(f"error: {self.command} {self.path}: {type(e).__name__}: {e}", file=sys.stderr)
            self.send_json(500, ApiError(500, f"internal error ({type(e).__name__})", kind="server_error").body())

    def get(self, path):
        if path in ("/", "/index.html"):
            with open(PAGE, "rb") as f:
                page = f.read()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        self.check_key()
        card = {"id": self.engine.name, "object": "model", "created": self.engine.created, "owned_by": "you",
                "kind": self.engine.kind, "context_length": self.engine.ctx}
        if path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [card]})
        elif path.startswith("/v1/models/"):
            self.check_model(path[len("/v1/models/"):])
            self.send_json(200, card)
        elif path in ("/v1/chat/completions", "/v1/completions"):
            raise ApiError(405, f"{path} takes POST requests")
        else:
            raise ApiError(404, f"no route GET {path}: the API has /v1/models, /v1/chat/completions and "
                           f"/v1/completions", code="unknown_url")

    def post(self, path):
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self.check_key()
            raise ApiError(404, f"no route POST {path}: POST to /v1/chat/completions or /v1/completions",
                           code="unknown_url")
        self.check_key()
        body = self.read_body()
        self.check_model(body.get("model"))
        chat = path == "/v1/chat/completions"
        if chat and self.engine.kind != "chat":
            raise ApiError(400, f"model {self.engine.name} is a {self.engine.kind} model, not an instruction-tuned "
                           f"chat model: send plain text to continue to /v1/completions, or fine-tune it with "
                           f"finetune_chat.py", "model", "not_a_chat_model")
        params = sampling_params(body, self.engine)
        ids, limit = prompt_and_limit(body, self.engine, chat, params)
        params["max_tokens"] = limit
        (self.stream if params["stream"] else self.complete)(ids, params, chat)

    def check_key(self):
        key = self.server.api_key
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer KEY` with the "
                           "server's --api_key", code="invalid_api_key")

    def check_model(self, name):
        if name not in (None, self.engine.name):
            raise ApiError(404, f"model {json.dumps(name)} is not served here: this server has {self.engine.name} "
                           f"(GET /v1/models)", "model", "model_not_found")

    def read_body(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            raise ApiError(411, "send the JSON body with a Content-Length header")
        if not length.isdigit():
            raise ApiError(400, f"Content-Length {length!r} is not a number")
        if int(length) > self.server.max_body:
            self.close_connection = True  # the body stays unread
            raise ApiError(413, f"the body is {length} bytes, over this server's limit of {self.server.max_body} "
                           f"(--max_body)", code="body_too_large")
        raw = self.rfile.read(int(length))
        try:
            body = parse_json(raw.decode("utf-8"), "the request body")
        except UnicodeDecodeError:
            raise ApiError(400, "the body is not UTF-8 text: send JSON") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"the body is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        except UserError as e:
            raise ApiError(400, str(e)) from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def gone(self):
        """Whether the client has closed its side: its socket reads as at an end (it sends nothing more)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    def answer_head(self, chat):
        prefix, kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": self.engine.name}

    @staticmethod
    def usage(prompt_ids, reply):
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": reply.n_tokens,
                "total_tokens": len(prompt_ids) + reply.n_tokens}

    def generate(self, ids, params, chat, each=None):
        """Run the request on the engine, calling each(piece) as the text comes -> the Reply, or None when the
        client left first. Closing the run on the way out (a write that failed) frees the model for the next."""
        run = self.engine.run(ids, params, chat, self.gone)
        try:
            while True:
                try:
                    piece = next(run)
                except StopIteration as done:
                    return done.value
                if each is not None:
                    each(piece)
        finally:
            run.close()

    def complete(self, ids, params, chat):
        reply = self.generate(ids, params, chat)
        if reply is None or reply.finish_reason is None:
            self.close_connection = True  # the client left, or the server is stopping
            return
        choice = ({"index": 0, "message": {"role": "assistant", "content": reply.text}} if chat else
                  {"index": 0, "text": reply.text, "logprobs": None})
        self.send_json(200, {**self.answer_head(chat), "choices": [{**choice, "finish_reason": reply.finish_reason}],
                             "usage": self.usage(ids, reply)})

    def stream(self, ids, params, chat):
        """Server-sent events: a chunk per settled piece of text as it is sampled, one with the finish_reason,
        one with usage when stream_options.include_usage asks, then `data: [DONE]`."""
        head = {**self.answer_head(chat), "object": "chat.completion.chunk" if chat else "text_completion"}

        def event(choice, **extra):
            obj = {**head, "choices": [{"index": 0, **choice}] if choice is not None else [], **extra}
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        def piece(text, finish=None):
            return ({"delta": {"content": text} if text or finish is None else {}, "finish_reason": finish} if chat
                    else {"text": text, "logprobs": None, "finish_reason": finish})

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True
        if chat:
            event({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        reply = self.generate(ids, params, chat, lambda text: event(piece(text)))
        if reply is None or reply.finish_reason is None:
            return  # the client left, or the server is stopping
        event(piece("", reply.finish_reason))
        if params["include_usage"]:
            event(None, usage=self.usage(ids, reply))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class Server(http.server.ThreadingHTTPServer):
    """A thread per connection (they queue on the engine's lock), a deep accept queue, and one-line logs of the
    errors that reach it."""
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, engine, api_key="", max_body=1 << 20):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, Handler)
        self.engine, self.api_key, self.max_body = engine, api_key, max_body

    def handle_error(self, request, client_address):
        kind, err = sys.exc_info()[:2]
        if not issubclass(kind, (BrokenPipeError, ConnectionResetError, socket.timeout)):
            print(f"error: request from {client_address[0]}: {kind.__name__}: {err}", file=sys.stderr)


def is_local(host):
    try:
        return host in LOCAL_HOSTS or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_engine(cfg, device, dtype):
    source = cfg["init"] or cfg["checkpoint"]
    if not cfg["init"] and not os.path.exists(source):
        raise UserError(f"no checkpoint at {source}: train one (finetune_chat.py, pretrain.py) or pass "
                        f"--checkpoint PATH (or --init gpt2)")
    model, info = init_model(source, device=device, int8_ok=True)
    ckpt = info["checkpoint"] or {"kind": info["kind"] or "pretrained"}
    name = cfg["model_name"] or os.path.splitext(os.path.basename(source.rstrip("/")))[0]
    return Engine(model.eval(), ckpt, name, cfg, device, dtype)


def serve_until_stopped(server):
    """Serve from a thread while the main thread waits for Ctrl-C or SIGTERM (settings.entry turns them into
    exceptions); then stop generating, stop accepting, and leave within a second."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    finally:
        server.engine.stopping.set()
        server.shutdown()
        server.server_close()


def main(argv=None):
    cfg = get_config(DEFAULTS, argv, __doc__, check=check_settings)
    torch.manual_seed(cfg["seed"])
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    engine = load_engine(cfg, device, dtype)
    try:
        server = Server((cfg["host"], cfg["port"]), engine, cfg["api_key"], cfg["max_body"])
    except OSError as e:
        raise UserError(f"cannot listen on {cfg['host']}:{cfg['port']} ({e.strerror}): pick another --port, or "
                        f"0 for any free one") from None
    host, port = server.server_address[:2]
    print(f"{describe_device(device, dtype, cfg['dtype'])}, {count_parameters(engine.model):,} parameters, "
          f"context {engine.ctx}, kind {engine.kind}", file=sys.stderr)
    if not is_local(cfg["host"]):
        print(f"warning: listening on {cfg['host']}, so other machines can reach this server: keep --host "
              f"127.0.0.1 unless you mean it{'' if cfg['api_key'] else ', and set --api_key'}", file=sys.stderr)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"serving {engine.name} at {url}/ (the chat page) and {url}/v1 (the API); Ctrl-C stops", flush=True)
    serve_until_stopped(server)


if __name__ == "__main__":
    try:
        entry(main)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # nothing is left to save: skip the interpreter's teardown, which torch makes last most of a second
