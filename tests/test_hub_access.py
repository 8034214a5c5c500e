"""Hub access as the user set it: fcmoe never turns it off itself, children inherit the user's decision, and a
failed hub load says whether the model was not cached while offline or the hub was unreachable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fcmoe.errors import hub_offline, why_hub_failed


def _fcmoe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcmoe.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_child_process_keeps_the_users_decision() -> None:
    """With HF_HUB_OFFLINE set, a hub id that is not cached is refused in words that say so, in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = _fcmoe(env, "plan", "--set", "model.name=qwen3_moe", "--set", "model.path=someorg/not-cached")
    assert done.returncode == 1
    assert "not in the local Hugging Face cache, and hub access is off (HF_HUB_OFFLINE is set)" in done.stderr
    probe = "import os, fcmoe.cli; print(os.environ.get('HF_HUB_OFFLINE', 'unset'))"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "unset"  # importing (or running) fcmoe turns nothing off


def test_unreachable_and_offline_are_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert not hub_offline()
    refused = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    assert why_hub_failed(refused).startswith("the hub is unreachable (We couldn't connect")
    other = OSError("someorg/model is not a valid model identifier")
    assert why_hub_failed(other) == "someorg/model is not a valid model identifier"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline() == "HF_HUB_OFFLINE"
    assert why_hub_failed(refused).startswith("not in the local Hugging Face cache, and hub access is off "
                                              "(HF_HUB_OFFLINE is set)")
    assert why_hub_failed(refused).endswith("(We couldn't connect to 'https://huggingface.co' to load the files)")
