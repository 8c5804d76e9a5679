"""Options: arguments beat TRIMTAB_* variables, which beat defaults; typos fail at init."""

from __future__ import annotations

from pathlib import Path

import pytest

from trimtab.options import Options, default_spool_dir, resolve


def test_arguments_beat_environment_beat_defaults() -> None:
    env = {"TRIMTAB_PROJECT": "from-env", "TRIMTAB_FLUSH_INTERVAL": "0.5", "TRIMTAB_TOKEN": "tt_env"}
    opts = resolve({"project": "from-arg", "token": None}, env)
    assert opts.project == "from-arg"
    assert opts.flush_interval == 0.5
    assert opts.token == "tt_env"
    assert opts.max_batch_points == Options().max_batch_points


def test_rank_comes_from_torchrun_variables() -> None:
    opts = resolve({}, {"RANK": "3", "WORLD_SIZE": "8"})
    assert (opts.rank, opts.world_size) == (3, 8)


def test_bool_and_bad_numbers_from_environment() -> None:
    assert resolve({}, {"TRIMTAB_REPLAY_ORPHANS": "false"}).replay_orphans is False
    with pytest.raises(ValueError, match="TRIMTAB_WINDOW"):
        resolve({}, {"TRIMTAB_WINDOW": "lots"})


def test_unknown_option_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match="flush_intervall"):
        resolve({"flush_intervall": 1.0}, {})


@pytest.mark.parametrize(
    ("server", "ws"),
    [
        ("http://h:1", "ws://h:1/ws/v1/agent"),
        ("https://h/", "wss://h/ws/v1/agent"),
        ("h:2", "ws://h:2/ws/v1/agent"),
        ("ws://h:3", "ws://h:3/ws/v1/agent"),
    ],
)
def test_server_url_becomes_websocket_url(server: str, ws: str) -> None:
    assert Options(server=server).ws_url == ws


def test_spool_dir_default_and_off() -> None:
    assert Options().spool_path == default_spool_dir()
    assert Options(spool_dir="off").spool_path is None


@pytest.mark.parametrize("server", ["http://localhost:99999", "http://[::1", "ftp://host", "http://"])
def test_malformed_server_url_fails_at_init(server: str) -> None:
    with pytest.raises(ValueError, match="not a valid"):
        resolve({"server": server}, {})


def test_a_server_on_this_machine_lends_its_local_token(tmp_path: Path) -> None:
    (tmp_path / "local-token").write_text("tt_local\n")
    env = {"TRIMTAB_DATA_DIR": str(tmp_path)}
    assert resolve({"server": "http://127.0.0.1:8000"}, env).token == "tt_local"
    assert resolve({"server": "http://localhost:8000"}, env).token == "tt_local"
    assert resolve({"server": "http://[::1]:8000"}, env).token == "tt_local"
    # a server elsewhere never gets it, and a token given explicitly wins
    assert resolve({"server": "http://trimtab.example.com:8000"}, env).token is None
    assert resolve({"server": "http://127.0.0.1:8000", "token": "tt_mine"}, env).token == "tt_mine"
    assert resolve({"server": "http://127.0.0.1:8000"}, {**env, "TRIMTAB_TOKEN": "tt_env"}).token == "tt_env"
    assert resolve({"server": "http://127.0.0.1:8000"}, {"TRIMTAB_DATA_DIR": str(tmp_path / "none")}).token is None
