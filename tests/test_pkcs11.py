"""The signer's key in a PKCS#11 token: SoftHSM2 (Debian's package) through python-pkcs11.

A throwaway token in a temporary folder (SOFTHSM2_CONF); the lab rotates its signing key into
it, appends entries signed by the token, and the ordinary verifier (registry verify, the trust
file, an exported log) accepts them. Skips, saying what is missing, where SoftHSM2 or
python-pkcs11 is not installed (`make test` installs both).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from tests.conftest import run_cli
from weightmark import Lab
from weightmark.registry.envelope import PAYLOAD_TYPE, pae

SOFTHSM_MODULES = [Path("/usr/lib/softhsm/libsofthsm2.so"), Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
                   Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")]
PIN = "4921"

pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed (pip install 'weightmark[hsm]')")
MODULE = next((m for m in SOFTHSM_MODULES if m.exists()), None)
if MODULE is None or shutil.which("softhsm2-util") is None:
    pytest.skip("SoftHSM2 is not installed (apt-get install softhsm2; make test does)", allow_module_level=True)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A fresh SoftHSM2 token labelled 'lab' in its own folder; the env that reaches it."""
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {"SOFTHSM2_CONF": str(conf)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "lab", "--pin", PIN, "--so-pin", "8642"],
                   env={**env, "PATH": "/usr/bin:/bin"}, check=True, capture_output=True)
    return env


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, r.stderr
    return r


def test_entries_signed_by_the_token_verify_with_the_ordinary_verifier(token: dict[str, str], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "lab"
    with Lab.init(home, passphrase=None) as lab:
        lab.add_licensee("Northwind Research Ltd", "GB")
        file_key = lab.keys.key_id
        file_signing_key = lab.keys.signing_key
    env = {**token, "WEIGHTMARK_PKCS11_PIN": PIN}
    spec = f"{MODULE}:lab:signer"
    token_key = ok(run_cli("keys", "rotate", "--pkcs11", spec, home=home, env=env)).stdout.strip()
    assert token_key != file_key
    assert json.loads((home / "signer.json").read_text())["key_id"] == token_key
    lid = ok(run_cli("licensee", "add", "Falkenstein KI GmbH", "--jurisdiction", "DE", home=home, env=env)).stdout
    # The ordinary verifier: the whole log, and an export checked against the trust file alone.
    doc = json.loads(ok(run_cli("registry", "verify", "--json", home=home, env=env)).stdout)
    assert doc["keys"] == [file_key, token_key]
    ok(run_cli("registry", "export", "--out", str(tmp_path / "export"), home=home, env=env))
    ok(run_cli("registry", "verify", "--from", str(tmp_path / "export")))
    # The last entry (the licensee) was signed by the token's key, which lab.pub now holds.
    monkeypatch.setenv("SOFTHSM2_CONF", token["SOFTHSM2_CONF"])
    monkeypatch.setenv("WEIGHTMARK_PKCS11_PIN", PIN)
    with Lab(home, passphrase=None) as lab:
        last = lab.registry.log_entries()[-1]
        assert last.key_id == token_key and lab.registry.licensee(lid.strip()).jurisdiction == "DE"
        public = load_pem_public_key((home / "lab.pub").read_bytes())
        public.verify(last.signature, pae(PAYLOAD_TYPE, last.payload))
        # The file's old key is retired: a signature by it for a new entry would not verify.
        assert file_signing_key.public_key().public_bytes_raw() != public.public_bytes_raw()


def test_token_errors_are_one_line(token: dict[str, str], tmp_path: Path) -> None:
    home = tmp_path / "lab"
    Lab.init(home, passphrase=None).close()
    spec = f"{MODULE}:lab:errors"
    cases = [
        ({}, "WEIGHTMARK_PKCS11_PIN", 4),
        ({"WEIGHTMARK_PKCS11_PIN": "0000"}, "wrong PIN", 4),
    ]
    for extra, words, code in cases:
        r = run_cli("keys", "rotate", "--pkcs11", spec, home=home, env={**token, **extra})
        assert r.returncode == code and r.stderr.startswith("Error: ") and len(r.stderr.splitlines()) == 1, r.stderr
        assert words in r.stderr
    r = run_cli("keys", "rotate", "--pkcs11", f"{MODULE}:no-such-token:x", home=home,
                env={**token, "WEIGHTMARK_PKCS11_PIN": PIN})
    assert r.returncode == 4 and "no token labelled 'no-such-token'" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run_cli("keys", "rotate", "--pkcs11", "just-a-path", home=home)
    assert r.returncode == 2 and "MODULE:TOKEN:LABEL" in r.stderr
    assert not (home / "signer.json").exists()


def test_a_move_killed_after_the_log_recorded_it_is_finished_and_rotating_back_leaves_the_token(
        token: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state a crash leaves between the rotation entry and signer.json (signer.next.json
    written, rotation in the log, lab.pub still the old key) is completed by the next command;
    `keys rotate` without --pkcs11 then moves signing back to a file key."""
    from weightmark.keys import key_id, public_key_pem
    from weightmark.pkcs11 import NEXT_SIGNER_FILE, TokenSigningKey, TokenSpec, signer_document

    monkeypatch.setenv("SOFTHSM2_CONF", token["SOFTHSM2_CONF"])
    monkeypatch.setenv("WEIGHTMARK_PKCS11_PIN", PIN)
    home = tmp_path / "lab"
    spec = TokenSpec(str(MODULE), "lab", "crash")
    with Lab.init(home, passphrase=None) as lab:
        old = lab.keys
        token_key = TokenSigningKey(spec, PIN, create=True)
        new_id = key_id(token_key.public_key())
        (home / NEXT_SIGNER_FILE).write_bytes(signer_document(spec, new_id))
        lab.registry.rotate_key(old, new_id, public_key_pem(token_key.public_key()).decode(), token_key)
    assert not (home / "signer.json").exists()
    env = {**token, "WEIGHTMARK_PKCS11_PIN": PIN}
    ok(run_cli("licensee", "add", "Northwind Research Ltd", "--jurisdiction", "GB", home=home, env=env))
    assert json.loads((home / "signer.json").read_text())["key_id"] == new_id
    assert not (home / NEXT_SIGNER_FILE).exists()
    with Lab(home, passphrase=None) as lab:
        assert lab.registry.log_entries()[-1].key_id == new_id
    back = ok(run_cli("keys", "rotate", home=home, env=env)).stdout.strip()
    assert back != new_id and not (home / "signer.json").exists()
    ok(run_cli("licensee", "add", "Falkenstein KI GmbH", "--jurisdiction", "DE", home=home, env=token))  # no PIN
    doc = json.loads(ok(run_cli("registry", "verify", "--json", home=home, env=token)).stdout)
    assert doc["keys"] == [old.key_id, new_id, back]
