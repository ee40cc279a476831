"""Queue a ComfyUI workflow headless: override inputs by node title, follow progress over the
websocket, download the images. Standard library only, so the file also works copied on its own.

    python client.py workflows/api/sdxl_4096_cutdiffusion.json --server http://127.0.0.1:8188 \\
        --set "Positive prompt.text=a lighthouse at dawn" --set "*.seed=5" --out out/

From Python: `run_workflow(path_or_dict, server, overrides=["Sampler.steps=30"], out_dir="out")`.
A UI-format file (what the frontend saves) is converted with the server's /object_info first.
"""

import argparse
import base64
import hashlib
import json
import os
import pathlib
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid

DEFAULT_SERVER = "http://127.0.0.1:8188"
# Frontend-only nodes: they have no server class and no place in an API-format graph.
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4


class ClientError(Exception):
    """Base of every error this client reports; `exit_code` is what the command line returns."""

    exit_code = 1


class ServerUnreachable(ClientError):
    exit_code = 2


class ValidationFailed(ClientError):
    exit_code = 3


class RunFailed(ClientError):
    exit_code = 4


class RunInterrupted(ClientError):
    exit_code = 5


# ---- UI format -> API format -------------------------------------------------------------------

def is_ui_format(workflow: dict) -> bool:
    return isinstance(workflow.get("nodes"), list) and "links" in workflow


def _options(spec) -> list | None:
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return (spec[1] if len(spec) > 1 else {}).get("options", [])
    return None


def is_widget(spec) -> bool:
    opts = spec[1] if len(spec) > 1 else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not opts.get("forceInput")


def has_control_widget(name: str, spec) -> bool:
    """Whether the frontend saves a 'control after generate' value right after this widget (its
    rule: INT widgets unless the schema says otherwise are controlled when named seed/noise_seed)."""
    opts = spec[1] if len(spec) > 1 else {}
    control = opts.get("control_after_generate")
    if spec[0] == "INT":
        return bool(control) if control is not None else name in ("seed", "noise_seed")
    return bool(control) and _options(spec) is not None


def widget_problem(value, spec) -> str | None:
    """Why `value` is not valid for a widget of this spec, or None."""
    opts = spec[1] if len(spec) > 1 else {}
    options = _options(spec)
    if options is not None:
        return None if value in options else f"{value!r} is not one of {options[:8]}{' ...' if len(options) > 8 else ''}"
    kind = spec[0]
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{value!r} is not an integer"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{value!r} is not a number"
    if "min" in opts and value < opts["min"]:
        return f"{value} is below the minimum {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"{value} is above the maximum {opts['max']}"
    return None


def ui_to_api(workflow: dict, object_info: dict, check_values: bool = True) -> dict:
    """The API-format graph of a UI-format workflow, as the frontend's *Export (API)* writes it:
    widgets_values mapped to the widget inputs in /object_info order (control-after-generate values
    skipped), links as [node id, output slot], Notes dropped, Reroutes and bypassed nodes spliced
    out, PrimitiveNode values written into their targets, muted nodes left out."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    problems = []

    def source(link_id, seen=()):
        _, origin, slot, *_ = links[link_id]
        node = nodes[origin]
        if link_id in seen:
            raise ClientError(f"link {link_id} loops through Reroute/bypassed nodes")
        if node["type"] == "Reroute" or node.get("mode") == BYPASSED:
            out_type = node["outputs"][slot]["type"]
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp["type"] == out_type):
                    return source(inp["link"], seen + (link_id,))
            return None
        if node["type"] == "PrimitiveNode":
            return ("value", node["widgets_values"][0])
        if node.get("mode") == MUTED:
            return None
        return [str(origin), slot]

    api = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        kind = node["type"]
        if kind in UI_ONLY or node.get("mode") in (MUTED, BYPASSED):
            continue
        info = object_info.get(kind)
        if info is None:
            problems.append(f"node {node['id']}: unknown node type {kind!r} (is its custom node pack installed?)")
            continue
        values = node.get("widgets_values") or []
        if isinstance(values, dict):  # some packs save widgets by name
            values = [values.get(name) for name in _widget_names(info)]
        values = iter(values)
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                if is_widget(spec):
                    value = next(values, _MISSING)
                    if has_control_widget(name, spec):
                        next(values, None)
                    if name not in linked:
                        if value is _MISSING:
                            if section == "required":
                                problems.append(f"node {node['id']} ({kind}): no saved value for widget '{name}'")
                            continue
                        problem = widget_problem(value, spec) if check_values else None
                        if problem:
                            problems.append(f"node {node['id']} ({kind}): input '{name}': {problem}")
                        inputs[name] = value
                        continue
                if name in linked:
                    src = source(linked[name])
                    if isinstance(src, tuple):
                        inputs[name] = src[1]
                    elif src is not None:
                        inputs[name] = src
        api[str(node["id"])] = {"inputs": inputs, "class_type": kind,
                                "_meta": {"title": node.get("title") or info.get("display_name") or kind}}
    if problems:
        raise ValidationFailed("workflow does not match this server's nodes:\n  " + "\n  ".join(problems))
    return api


_MISSING = object()


def _widget_names(info: dict) -> list:
    return [name for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items() if is_widget(spec)]


# ---- overrides by title --------------------------------------------------------------------------

def _coerce(raw: str, current):
    """The override text as the type of the value it replaces (prompt text stays text)."""
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{raw!r} is not true/false")
        return raw.lower() in ("true", "1")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, str):
        return raw
    return json.loads(raw)


def apply_overrides(prompt: dict, overrides) -> dict:
    """Set inputs by node title: "Title.input=value"; "*.input=value" sets that input on every node
    that has it (e.g. "*.seed=5"). A node id works in place of its title. Returns the prompt."""
    for item in overrides:
        target, sep, raw = item.partition("=")
        title, dot, name = target.rpartition(".")
        if not sep or not dot or not title or not name:
            raise ClientError(f"override {item!r}: expected TITLE.INPUT=VALUE, e.g. \"Positive prompt.text=a castle\"")
        if title == "*":
            matches = [(nid, n) for nid, n in prompt.items() if name in n["inputs"]]
        else:
            matches = [(nid, n) for nid, n in prompt.items() if n.get("_meta", {}).get("title") == title or nid == title]
        if not matches:
            titles = sorted({n.get("_meta", {}).get("title", nid) for nid, n in prompt.items()})
            raise ClientError(f"override {item!r}: no node titled {title!r}{' has input ' + repr(name) if title == '*' else ''}; "
                              f"titles in this workflow: {', '.join(titles)}")
        for nid, node in matches:
            if name not in node["inputs"]:
                raise ClientError(f"override {item!r}: node {nid} ({node['class_type']}) has no input {name!r}; "
                                  f"its inputs: {', '.join(sorted(node['inputs']))}")
            current = node["inputs"][name]
            if isinstance(current, list):
                raise ClientError(f"override {item!r}: input {name!r} of node {nid} is connected to node {current[0]}; "
                                  "set the value on that node instead")
            try:
                node["inputs"][name] = _coerce(raw, current)
            except ValueError as e:
                raise ClientError(f"override {item!r}: {e}") from None
    return prompt


# ---- HTTP and websocket --------------------------------------------------------------------------

class Server:
    """A ComfyUI server URL; every request error becomes a ClientError naming the server."""

    def __init__(self, url: str = DEFAULT_SERVER, timeout: float = 30):
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            self.url = "http://" + self.url
        self.timeout = timeout

    def _unreachable(self, reason) -> ServerUnreachable:
        return ServerUnreachable(f"cannot reach ComfyUI at {self.url}: {reason}. Is it running? "
                                 "(start it with `python main.py --listen 127.0.0.1 --port 8188`, or pass --server URL)")

    def request(self, path: str, payload=None, raw: bool = False):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            raise self._unreachable(getattr(e, "reason", e)) from None
        return 200, body if raw else json.loads(body or b"null")

    def get(self, path: str, raw: bool = False):
        status, body = self.request(path, raw=raw)
        if status != 200:
            raise ClientError(f"GET {path} on {self.url} answered {status}: {body}")
        return body

    def websocket(self, client_id: str, timeout: float) -> "WebSocket":
        parts = urllib.parse.urlsplit(self.url)
        try:
            return WebSocket(parts, f"/ws?clientId={client_id}", timeout)
        except (OSError, ConnectionError) as e:
            raise self._unreachable(e) from None


class WebSocket:
    """The client side of RFC 6455, as much as ComfyUI's /ws needs: text and binary messages,
    fragments, ping/pong, close. Frames the client sends are masked, as the RFC requires."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, parts, path: str, timeout: float):
        port = parts.port or (443 if parts.scheme == "https" else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        self.sock, self.buf = sock, b""
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if not head.startswith(b"HTTP/1.1 101") or accept.encode() not in head:
            raise ConnectionError(f"websocket upgrade refused: {head.decode(errors='replace').splitlines()[0]}")

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the websocket")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes = b""):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self):
        """The next message: (is_text, payload bytes)."""
        parts, opcode = [], None
        while True:
            b0, b1 = self._take(2)
            n = b1 & 0x7F
            if n >= 126:
                n = int.from_bytes(self._take(2 if n == 126 else 8), "big")
            mask = self._take(4) if b1 & 0x80 else None
            payload = self._take(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            op = b0 & 0x0F
            if op == 0x8:
                raise ConnectionError("the server closed the websocket")
            if op == 0x9:
                self._send(0xA, payload)
                continue
            if op == 0xA:
                continue
            if op != 0:
                opcode = op
            parts.append(payload)
            if b0 & 0x80:
                return opcode == 0x1, b"".join(parts)

    def close(self):
        try:
            self._send(0x8)
        except OSError:
            pass
        self.sock.close()


# ---- running a workflow --------------------------------------------------------------------------

def format_node_errors(reply: dict, prompt: dict) -> str:
    """The host's /prompt refusal, one line per node input: node id, class, title, input, message."""
    error = reply.get("error", {}) if isinstance(reply, dict) else {}
    lines = [f"the server refused the workflow: {error.get('message', reply)}"
             + (f" ({error['details']})" if error.get("details") else "")]
    for nid, entry in (reply.get("node_errors") or {}).items() if isinstance(reply, dict) else ():
        title = prompt.get(nid, {}).get("_meta", {}).get("title", "")
        for err in entry.get("errors", []):
            name = err.get("extra_info", {}).get("input_name")
            where = f"node {nid} ({entry.get('class_type', '?')}{', ' + repr(title) if title else ''})"
            lines.append(f"  {where}: " + (f"input '{name}': " if name else "") + err.get("message", "")
                         + (f": {err['details']}" if err.get("details") else ""))
    return "\n".join(lines)


def load_workflow(workflow, server: Server) -> dict:
    """An API-format prompt (a fresh copy) from a path, a UI/API dict or JSON text."""
    if isinstance(workflow, (str, os.PathLike)) and not str(workflow).lstrip().startswith("{"):
        path = pathlib.Path(workflow)
        try:
            workflow = json.loads(path.read_text())
        except OSError as e:
            raise ClientError(f"cannot read workflow {path}: {e.strerror}") from None
        except ValueError as e:
            raise ClientError(f"{path} is not JSON: {e}") from None
    elif isinstance(workflow, str):
        workflow = json.loads(workflow)
    if is_ui_format(workflow):
        return ui_to_api(workflow, server.get("/object_info"))
    return json.loads(json.dumps(workflow))


def print_event(kind: str, data: dict, prompt: dict) -> None:
    """Default progress report on stderr."""
    node = data.get("node")
    label = f"{node} ({prompt[node]['_meta'].get('title', prompt[node]['class_type'])})" if node in prompt else node
    if kind == "progress":
        print(f"\r  {label}: {data['value']}/{data['max']}", end="", file=sys.stderr, flush=True)
    elif kind == "executing" and node is not None:
        print(f"\nrunning node {label}", end="", file=sys.stderr, flush=True)
    elif kind == "execution_cached" and data.get("nodes"):
        print(f"cached: {', '.join(data['nodes'])}", file=sys.stderr)
    elif kind == "execution_success":
        print("\ndone", file=sys.stderr)


def run_workflow(workflow, server: str = DEFAULT_SERVER, overrides=(), out_dir=None, on_event=print_event,
                 idle_timeout: float = 900, on_queued=None) -> dict:
    """Queue `workflow` (path, dict or JSON; API or UI format), follow it to the end and download
    its images into `out_dir` (if given). Returns {"prompt_id", "outputs" (the history entry's
    outputs), "files" (paths written)}. Raises ServerUnreachable, ValidationFailed, RunFailed or
    RunInterrupted with a readable message."""
    srv = Server(server)
    prompt = apply_overrides(load_workflow(workflow, srv), overrides)
    client_id = uuid.uuid4().hex
    ws = srv.websocket(client_id, idle_timeout)  # connected before queueing, so no message is missed
    try:
        status, reply = srv.request("/prompt", {"prompt": prompt, "client_id": client_id})
        if status != 200:
            raise ValidationFailed(format_node_errors(reply, prompt))
        prompt_id = reply["prompt_id"]
        if reply.get("node_errors"):  # the host queues the outputs that did validate: take them back out
            srv.request("/queue", {"delete": [prompt_id]})
            raise ValidationFailed(format_node_errors(
                dict(reply, error={"message": f"some outputs failed validation (prompt {prompt_id} removed from the queue)"}), prompt))
        if on_queued:
            on_queued(prompt_id)
        _follow(ws, prompt_id, prompt, on_event, idle_timeout)
    finally:
        ws.close()
    outputs = srv.get(f"/history/{prompt_id}").get(prompt_id, {}).get("outputs", {})
    files = download_outputs(srv, outputs, out_dir) if out_dir is not None else []
    return {"prompt_id": prompt_id, "outputs": outputs, "files": files}


def _follow(ws: WebSocket, prompt_id: str, prompt: dict, on_event, idle_timeout: float) -> None:
    while True:
        try:
            is_text, payload = ws.recv()
        except socket.timeout:
            raise ClientError(f"no message from the server for {idle_timeout:.0f} s while prompt {prompt_id} ran") from None
        if not is_text:
            continue  # binary frames are latent previews
        message = json.loads(payload)
        kind, data = message.get("type"), message.get("data") or {}
        if data.get("prompt_id", prompt_id) != prompt_id:
            continue
        if on_event:
            on_event(kind, data, prompt)
        if kind == "execution_error":
            where = f"node {data.get('node_id')} ({data.get('node_type')})"
            error_type = str(data.get("exception_type") or "error").rsplit(".", 1)[-1]  # custom nodes: a file path prefix
            raise RunFailed(f"the run failed at {where}: {error_type}: "
                            f"{str(data.get('exception_message', '')).strip()}")
        if kind == "execution_interrupted":
            raise RunInterrupted(f"the run was interrupted at node {data.get('node_id')} ({data.get('node_type')}) "
                                 "(Cancel in the UI or POST /interrupt)")
        # The host sends this after writing the history entry (execution_success comes before it).
        if kind == "executing" and data.get("node") is None and "prompt_id" in data:
            return


def download_outputs(srv: Server, outputs: dict, out_dir) -> list:
    """Fetch every saved output file (/view) into out_dir, keeping the server's subfolder."""
    out_dir = pathlib.Path(out_dir)
    files = []
    for node_output in outputs.values():
        for item in node_output.get("images", []):
            if item.get("type") != "output":
                continue  # previews live in temp/
            query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
            dest = out_dir / item.get("subfolder", "") / item["filename"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(srv.get(f"/view?{query}", raw=True))
            files.append(dest)
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Queue a ComfyUI workflow (API or UI format) and download its images.")
    parser.add_argument("workflow", help="workflow JSON file (e.g. workflows/api/sdxl_4096_cutdiffusion.json)")
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"ComfyUI URL (default {DEFAULT_SERVER})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="TITLE.INPUT=VALUE",
                        help='override an input by node title, e.g. "Positive prompt.text=a castle", "*.seed=5" (repeatable)')
    parser.add_argument("--out", default="out", help="folder for the downloaded images (default ./out)")
    parser.add_argument("--idle-timeout", type=float, default=900, help="seconds without a server message before giving up")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        result = run_workflow(args.workflow, args.server, args.overrides, args.out,
                              on_event=None if args.quiet else print_event, idle_timeout=args.idle_timeout)
    except ClientError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return e.exit_code
    for path in result["files"]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
