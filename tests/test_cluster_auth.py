"""cluster.yaml's head, replayed on this machine: Ray's token authentication is on.

The head is started from cluster.yaml itself: the ``ray start --head`` line of
``head_start_ray_commands``, the environment the container gets (``docker.run_options``
``--env``), and the token at the path ``file_mounts`` puts it (Ray's default path under the
home directory). Only what needs a cloud changes: free ports instead of fixed ones, no
autoscaling config, a private temp dir. Then the job API (``ray job submit``, what the
README's commands and a cron line use) refuses a job without the token or with a wrong one,
runs one with it (its driver connects through refseg's own ``ensure_ray``), and is not
reachable on a non-loopback address.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.ray_head import RAY, ray_head

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
DOCS = (ROOT / "README.md", ROOT / "deploy" / "kubernetes" / "README.md", CLUSTER_YAML)
CONTAINER_HOME = "/home/ray"  # the Ray image's user


def _config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def head_start_argv(config: dict) -> list[str]:
    """The arguments of cluster.yaml's ``ray start --head`` (after ``ray start``)."""
    (line,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    argv = shlex.split(line.rsplit(";", 1)[-1])
    assert argv[:3] == ["ray", "start", "--head"], line
    return argv[2:]


def container_env(config: dict) -> dict[str, str]:
    """``--env K=V`` / ``-e K=V`` options of the containers."""
    env = {}
    for option in config["docker"].get("run_options", []):
        flag, _, value = option.partition(" ")
        if flag in ("--env", "-e"):
            key, _, val = value.partition("=")
            env[key] = val
    return env


def token_path_in_home(config: dict) -> Path:
    """Where cluster.yaml puts the token, relative to the container's home."""
    (target,) = [t for t in config["file_mounts"] if t.endswith("auth_token")]
    source = config["file_mounts"][target]
    assert source == "~/.ray/auth_token", "the token comes from the user's machine"
    return Path(target).relative_to(CONTAINER_HOME)


def test_cluster_yaml_turns_token_auth_on_and_keeps_the_dashboard_on_loopback():
    config = _config()
    assert container_env(config)["RAY_AUTH_MODE"] == "token"
    # Ray reads ~/.ray/auth_token by default: the mount is exactly that path in the image
    assert token_path_in_home(config) == Path(".ray/auth_token")
    argv = head_start_argv(config)
    assert "--dashboard-host=127.0.0.1" in argv
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in text and "RAY_AUTH_MODE=disabled" not in text
    for command in config["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE" not in command  # the container's env holds for workers too


def documented_ray_job_commands(text: str, *, markdown: bool = True) -> list[tuple[str, bool]]:
    """(command, token given) for every `ray job ...` command of a document's code.

    Code: a Markdown document's fenced blocks, every line of another file. The token counts
    as given by ``RAY_AUTH_MODE=token`` on the line, an ``export RAY_AUTH_MODE=token``
    earlier in the same block, or ``ray exec cluster.yaml`` (a shell in the head's
    container, whose environment has it).
    """
    found = []
    in_code = not markdown
    exported = False
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if markdown and line.startswith("```"):
            in_code, exported = not in_code, False
            continue
        if not in_code:
            continue
        exported |= line.strip().startswith("export RAY_AUTH_MODE=token")
        if re.search(r"\bray job (submit|logs|list|status|stop)\b", line):
            given = "RAY_AUTH_MODE=token" in line or "ray exec cluster.yaml" in line
            found.append((line.strip(" #"), given or exported))
    return found


def test_every_documented_command_passes_the_token_to_a_loopback_job_api():
    commands = [
        c
        for doc in DOCS
        for c in documented_ray_job_commands(doc.read_text(), markdown=doc.suffix == ".md")
    ]
    assert len(commands) >= 4
    for command, token_given in commands:
        assert token_given, command
        assert "http://127.0.0.1:8265" in command, command  # through a tunnel, never open
    for doc in DOCS:
        assert "HEAD:8265" not in doc.read_text()


def test_the_command_check_catches_a_command_without_the_token():
    doc = "```\nray job submit --address http://127.0.0.1:8265 -- x\n```\n"
    assert documented_ray_job_commands(doc) == [
        ("ray job submit --address http://127.0.0.1:8265 -- x", False)
    ]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """cluster.yaml's head on this machine, with a fresh token at its default path."""
    config = _config()
    home = tmp_path_factory.mktemp("head_home")
    token = secrets.token_hex(32)
    path = home / token_path_in_home(config)
    path.parent.mkdir(parents=True)
    path.write_text(token)
    path.chmod(0o600)
    argv = [a for a in head_start_argv(config) if not a.startswith("--autoscaling-config")]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        **container_env(config),
        "HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    with ray_head([*argv, "--num-cpus=1"], env) as info:
        yield {**info, "token": token, "env": env}


def _client_env(**extra: str) -> dict[str, str]:
    """A client machine's environment: no Ray settings, an empty home (no token file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": "/nonexistent", "RAY_USAGE_STATS_ENABLED": "0", **extra}


# The job: refseg's driver connects to the cluster it runs on (RAY_ADDRESS set by Ray)
_ENTRYPOINT = (
    f"{sys.executable} -c 'from refseg.pipeline.run import ensure_ray; ensure_ray(); "
    'import ray; print("REFSEG-JOB-RAN", ray.cluster_resources()["CPU"])\''
)


def _submit(head: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", "submit", "--address", head["dashboard"], "--", *shlex.split(_ENTRYPOINT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_job_without_the_token_is_refused(head):
    proc = _submit(head, _client_env())
    assert proc.returncode != 0
    assert "Unauthorized: Missing authentication token" in proc.stdout + proc.stderr
    assert "REFSEG-JOB-RAN" not in proc.stdout + proc.stderr


def test_a_job_with_a_wrong_token_is_refused(head):
    proc = _submit(head, _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64))
    assert proc.returncode != 0
    assert "Forbidden: Invalid authentication token" in proc.stdout + proc.stderr


def test_a_job_with_the_token_runs(head):
    proc = _submit(head, _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head["token"]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "REFSEG-JOB-RAN 1.0" in proc.stdout
    assert "succeeded" in proc.stdout + proc.stderr


def test_raw_http_without_the_token_is_refused(head):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(head["dashboard"] + "/api/jobs/", timeout=10)
    assert err.value.code == 401


def _non_loopback_ipv4() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_the_job_api_does_not_listen_on_other_interfaces(head):
    ip = _non_loopback_ipv4()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    port = head["ports"]["--dashboard-port"]
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(3)
        s.connect((ip, port))
