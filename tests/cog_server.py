"""Start and stop cog's real HTTP server (cog 0.23.1, no Docker) on predict.py."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predictor_folder(min_size: int) -> Path:
    """A folder with predict.py and the schema `cog build` would write for it had its sizes'
    ``ge`` been ``min_size`` (predict.py says 256: it serves SD 1.5; a model of another native
    size, such as the stand-in's 32 px, is served from here)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="fasterdiff-predictor-"))
    (folder / ".cog").mkdir()
    (folder / "predict.py").write_text((ROOT / "predict.py").read_text())
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    for name in ("width", "height"):
        schema["components"]["schemas"]["Input"]["properties"][name]["minimum"] = min_size
    (folder / ".cog" / "openapi_schema.json").write_text(json.dumps(schema))
    return folder


class CogServer:
    def __init__(self, weights: Path, extra_env: dict | None = None, min_size: int | None = None):
        """``min_size``: serve from :func:`predictor_folder` with that smallest width and height."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            PORT=str(self.port),
            COG_PREDICT_TYPE_STUB="predict.py:Predictor",
            FASTERDIFF_WEIGHTS=str(weights),
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            # the server's worker runs `python`: the venv's must come first
            PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        )
        cwd = self.folder = ROOT
        if min_size is not None:
            cwd = self.folder = predictor_folder(min_size)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(extra_env or {})
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"cog-server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_setup(self, timeout: float = 180) -> dict:
        """Poll /health-check until setup has ended; return its JSON."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cog server exited: {self.log_path.read_text()[-3000:]}")
            try:
                health = self.get("/health-check")
                if health.get("status") not in (None, "STARTING"):
                    return health
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"cog server not ready after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def predict(self, inputs: dict, timeout: float = 300) -> tuple[int, dict]:
        """POST /predictions; (HTTP status, JSON body).

        coglet frees its prediction slot a moment after answering, so a request sent
        right after the previous one can be refused as "At capacity"; retry those.
        """
        for _ in range(100):
            status, body = self._post(inputs, timeout)
            if "At capacity" not in str(body.get("error")):
                return status, body
            time.sleep(0.1)
        return status, body

    def _post(self, inputs: dict, timeout: float) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + "/predictions",
            data=json.dumps({"input": inputs}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        if self.folder != ROOT:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def running(weights: Path, extra_env: dict | None = None, min_size: int | None = None):
    """A server set up on ``weights``, READY (its health check in ``srv.health``), stopped afterwards."""
    srv = CogServer(weights, extra_env, min_size)
    try:
        health = srv.health = srv.wait_setup()
        assert health["status"] == "READY", health
        yield srv
    finally:
        srv.stop()
