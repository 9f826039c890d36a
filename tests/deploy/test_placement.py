"""KubeRay placement on a local Ray: per-role custom resources put each service's actors where they are offered,
and host = "node-ip" makes every actor bind its own node's IP."""

from __future__ import annotations

import time

import pytest

from services.client import build_request
from services.config import ConfigError, load_config
from services.stack import NODE_IP, LocalStack, RayStack
from tests.services.conftest import collect, run

ROLES = ("sender", "adapter", "receiver", "relay")


def placed_config(**overrides):
    roles = {role: {"num_cpus": 0.25, "resources": {f"densecomm_{role}": 1}} for role in ROLES}
    return load_config(None, relay_port=0, host=NODE_IP, **roles, **overrides)


def test_resources_are_read_and_checked(tmp_path):
    config = placed_config()
    assert config.sender.resources == {"densecomm_sender": 1}
    toml = tmp_path / "serve.toml"
    toml.write_text('[receiver]\nresources = {densecomm_receiver = 0}\n')
    with pytest.raises(ConfigError, match="densecomm_receiver"):
        load_config(toml)


def test_node_ip_needs_ray():
    with pytest.raises(ConfigError, match="node-ip"):
        LocalStack(placed_config())


def test_actors_take_their_role_resource_and_bind_the_node_ip():
    import ray

    with RayStack(placed_config()) as stack:
        total = ray.cluster_resources()
        # available_resources() is reported asynchronously (a loaded machine can show a held unit as free for a
        # moment after the actor started): read it until it settles, for at most 10 s
        deadline = time.monotonic() + 10
        while True:
            left = ray.available_resources()
            if all(left.get(f"densecomm_{role}", 0) == 0 for role in ROLES) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for role in ROLES:  # each role's only unit is held by its actor
            assert total[f"densecomm_{role}"] == 1 and left.get(f"densecomm_{role}", 0) == 0, (role, left)
        node_ip = ray.util.get_node_ip_address()
        for role in ("sender", "adapter", "receiver"):
            assert all(a.startswith(f"{node_ip}:") for a in stack.addresses[role]), stack.addresses
        events = run(collect(stack.relay_address, build_request("The cat sat.", mode="unaware", max_new_tokens=4)))
        assert events[-1].stats.route == "zoo" and events[-1].stats.wire_bytes > 0


def test_a_bad_security_file_is_named_before_any_actor_starts(tmp_path):
    """Each service's security files are checked by a task placed as its actors are (here: on the node offering
    its role's resource), before the first actor starts; no actor is left behind."""
    import ray

    from services import stack as stack_module

    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-0123456789abcdef no-such-route\n")
    config = placed_config(auth_tokens_file=str(tokens))
    with pytest.raises(ConfigError, match="no-such-route"):  # a Ray the stack starts: checked in this process
        RayStack(config)
    assert not ray.is_initialized()  # the stack shut the Ray it started down again
    # a Ray it joins (a cluster): checked by a task on a node of each role
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False, num_cpus=2,
             resources={f"densecomm_{role}": 1 for role in ROLES}, configure_logging=False)
    try:
        stack_module.check_files_on_nodes(placed_config())  # good files pass
        with pytest.raises(ConfigError, match="no-such-route"):
            RayStack(config)
    finally:
        ray.shutdown()
