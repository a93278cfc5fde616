"""A real graphite-web on a loopback port, reading a CarbonServer's whisper files.

graphite-web runs in a child process under waitress (a production WSGI
server), configured by a small local-settings module written to the work
directory, so every instance has its own sqlite database and data directory.
It is what the Grafana dashboard tests query to prove each panel target
returns data. PyPI's graphite-web 1.1.10 serves from this Python where it
installs (up to 3.11); elsewhere Debian's does, from the system Python.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness._process import ServerProcess
from harness.carbon import CarbonServer

__all__ = [
    "GraphiteWeb",
    "GraphiteWebNotFoundError",
    "find_graphite_web_python",
    "graphite_module_file",
]

_SETTINGS_MODULE = "harness_graphite_local_settings"


class GraphiteWebNotFoundError(RuntimeError):
    """graphite-web (or waitress) is not importable in this Python."""


_MODULES = ("graphite.render", "django", "waitress")

# Debian's graphite-web (package graphite-web, with python3-waitress) for
# Pythons that PyPI's graphite-web 1.1.10 does not install on (3.12+). It runs
# as its own process, so the system Python serves it whatever the venv's is.
_SYSTEM_PYTHON = "/usr/bin/python3"


def _missing_modules(python: str) -> list[str]:
    """The graphite-web modules ``python`` cannot import."""
    if python == sys.executable:
        return [m for m in _MODULES if importlib.util.find_spec(m) is None]
    probe = (
        "import importlib.util as u, sys;"
        "print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))"
    )
    try:
        found = subprocess.run(
            [python, "-c", probe, *_MODULES], capture_output=True, text=True, timeout=30
        )
    except OSError:
        return list(_MODULES)
    return found.stdout.split() if found.returncode == 0 else list(_MODULES)


def find_graphite_web_python() -> str:
    """The Python that runs graphite-web: this one if it has graphite-web
    (PyPI's, on Python <= 3.11), else the system's with Debian's."""
    missing = _missing_modules(sys.executable)
    if not missing:
        return sys.executable
    if os.path.exists(_SYSTEM_PYTHON) and not _missing_modules(_SYSTEM_PYTHON):
        return _SYSTEM_PYTHON
    raise GraphiteWebNotFoundError(
        f"graphite-web needs {', '.join(missing)}: on Python <= 3.11 run "
        "`pip install -r requirements-dev.txt` (graphite-web 1.1.10); on any Python "
        "`apt-get install graphite-web python3-waitress` (Debian's graphite-web)"
    )


def graphite_module_file(module: str) -> Path:
    """The source file of one of graphite-web's modules, in whichever Python
    serves it (for reading what that graphite-web offers)."""
    probe = "import importlib.util, sys; print(importlib.util.find_spec(sys.argv[1]).origin)"
    found = subprocess.run(
        [find_graphite_web_python(), "-c", probe, module],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return Path(found.stdout.strip())


class GraphiteWeb(ServerProcess):
    """graphite-web serving ``/render`` and ``/metrics/find`` over HTTP on loopback.

    With a ``carbon`` server it also asks carbon's cache (carbonlink) for
    points not yet on disk, as a real installation does; ``carbonlink=False``
    shows only what ``CarbonServer.fetch`` sees (a paused carbon then cannot
    slow renders down). With only a ``whisper_dir`` graphite-web logs a failed
    CarbonLink query per series, which is harmless.

    ``start_seconds`` includes the database migration that precedes serving.
    """

    name = "graphite-web"

    def __init__(
        self,
        work_dir: Path,
        carbon: CarbonServer | None = None,
        whisper_dir: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        carbonlink: bool = True,
        start_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(work_dir, host, port, start_timeout_s)
        if whisper_dir is None:
            if carbon is None:
                raise ValueError("GraphiteWeb needs a carbon server or a whisper_dir")
            whisper_dir = carbon.data_dir
        self.whisper_dir = Path(whisper_dir)
        self.carbon = carbon
        self.carbonlink = carbonlink and carbon is not None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _prepare(self) -> tuple[list[str], dict[str, str] | None]:
        python = find_graphite_web_python()
        env = self._write_settings()
        migrate = subprocess.run(
            [python, "-m", "django", "migrate", "--noinput", "-v", "0"],
            env=env,
            cwd=str(self.work_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=self.start_timeout_s,
        )
        if migrate.returncode != 0:
            raise RuntimeError(
                f"graphite-web `django-admin migrate` failed:\n{migrate.stdout.decode()[-3000:]}"
            )
        command = [
            python,
            "-m",
            "waitress",
            f"--listen={self.host}:{self.port}",
            "--threads=4",
            "graphite.wsgi:application",
        ]
        return command, env

    # -- queries --

    def get_json(self, path: str, params: Sequence[tuple[str, str]], timeout_s: float = 30.0):
        """GET ``path`` with ``params`` and decode the JSON answer."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(list(params))}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")[-2000:]
            raise RuntimeError(
                f"graphite-web answered {exc.code} to {url}: {body}\nlog tail:\n{self.log_tail(15)}"
            ) from exc

    def render(
        self,
        target: str | Sequence[str],
        from_: str = "-1h",
        until: str = "now",
        max_data_points: int | None = None,
    ) -> list[dict[str, Any]]:
        """``/render?format=json``: one dict per series, ``datapoints`` as [value, ts] pairs."""
        targets = [target] if isinstance(target, str) else list(target)
        params = [("target", t) for t in targets]
        params += [("from", from_), ("until", until), ("format", "json")]
        if max_data_points is not None:
            params.append(("maxDataPoints", str(max_data_points)))
        return self.get_json("/render", params)

    def find(self, query: str) -> list[dict[str, Any]]:
        """``/metrics/find``, as Grafana's template variables use it."""
        return self.get_json("/metrics/find", [("query", query)])

    # -- configuration --

    def _write_settings(self) -> dict[str, str]:
        storage_dir = self.work_dir / "graphite-web"
        (storage_dir / "log").mkdir(parents=True, exist_ok=True)
        carbonlink_hosts = []
        if self.carbonlink and self.carbon is not None:
            host, port = self.carbon.cache_query_address
            carbonlink_hosts = [f"{host}:{port}"]
        settings = {
            "SECRET_KEY": "harness-only-not-secret",
            "STORAGE_DIR": str(storage_dir),
            "LOG_DIR": str(storage_dir / "log"),
            "INDEX_FILE": str(storage_dir / "index"),
            "WHISPER_DIR": str(self.whisper_dir),
            "STANDARD_DIRS": [str(self.whisper_dir)],
            "STORAGE_FINDERS": ["graphite.finders.standard.StandardFinder"],
            "CARBONLINK_HOSTS": carbonlink_hosts,
            "DATABASES": {
                "default": {
                    "ENGINE": "django.db.backends.sqlite3",
                    "NAME": str(storage_dir / "graphite.db"),
                }
            },
            # No caching: a test that sends more points and renders again
            # must see them, not a minute-old answer.
            "CACHES": {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}},
            "DEFAULT_CACHE_DURATION": 0,
            "FIND_CACHE_DURATION": 0,
            "ALLOWED_HOSTS": ["127.0.0.1", "localhost"],
            "TIME_ZONE": "UTC",
        }
        module = self.work_dir / f"{_SETTINGS_MODULE}.py"
        module.write_text(
            "# Generated by harness/graphite_web.py\n"
            + "".join(f"{key} = {value!r}\n" for key, value in settings.items()),
            encoding="utf-8",
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.work_dir), env.get("PYTHONPATH", "")) if p
        )
        env["DJANGO_SETTINGS_MODULE"] = "graphite.settings"
        # graphite.settings imports this module as its local_settings.
        env["GRAPHITE_SETTINGS_MODULE"] = _SETTINGS_MODULE
        env["GRAPHITE_STORAGE_DIR"] = str(storage_dir)
        env["PYTHONUNBUFFERED"] = "1"
        return env
