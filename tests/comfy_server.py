"""Start the real ComfyUI host headless, as a separate process, with only this pack among custom nodes.

Loopback only, a free port, `--disable-api-nodes`, an in-memory database and a private base
directory (models, input, output). Readiness is polled over HTTP; stop() ends the process by PID.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from host import COMFYUI_DIR, PACK_NAME, make_base_directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base_directory: pathlib.Path, python: str = sys.executable, extra_args=(), extra_packs=None,
                 cpu: bool = True):
        """extra_packs: {folder name: path} of more custom-node folders to link and load (test fixtures);
        cpu=False lets the host use its accelerator (the main job's real-checkpoint run)."""
        self.base = make_base_directory(pathlib.Path(base_directory))
        for name, path in (extra_packs or {}).items():
            if not (self.base / "custom_nodes" / name).exists():
                (self.base / "custom_nodes" / name).symlink_to(path, target_is_directory=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.cmd = [
            python, str(COMFYUI_DIR / "main.py"), *(["--cpu"] if cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-api-nodes", "--database-url", "sqlite:///:memory:", "--base-directory", str(self.base),
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME, *(extra_packs or {}),
            "--use-pytorch-cross-attention", "--disable-auto-launch", *extra_args,
        ]
        self.proc = None

    def start(self, timeout: float = 300.0) -> "ComfyServer":  # a busy 2-core machine needs minutes
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=COMFYUI_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start:\n{self.log()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run_prompt(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue an API-format graph and wait for its history entry; raises with the host's errors."""
        status, reply = self.post("/prompt", {"prompt": prompt})
        if status != 200:
            raise RuntimeError(f"/prompt refused ({status}): {json.dumps(reply, indent=1)}")
        entry = self._finished(reply["prompt_id"], timeout)
        if entry["status"].get("status_str") != "success":
            raise RuntimeError(f"prompt failed: {json.dumps(entry['status'], indent=1)}\n{self.log()}")
        return entry

    def prompt_error(self, prompt: dict, timeout: float = 300) -> str:
        """Queue a graph that must fail and return what the host tells its user: the validation
        errors of a refused prompt (JSON), or 'node type: message' of the node that failed while running."""
        status, reply = self.post("/prompt", {"prompt": prompt})
        if status != 200:
            return json.dumps(reply)
        entry = self._finished(reply["prompt_id"], timeout)
        for kind, data in entry["status"].get("messages", []):
            if kind == "execution_error":
                return f"{data['node_type']}: {data['exception_message']}"
        raise AssertionError(f"the prompt did not fail: {json.dumps(entry['status'], indent=1)}")

    def _finished(self, pid: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                return hist[pid]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} not done after {timeout}s\n{self.log()}")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
