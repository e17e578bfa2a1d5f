"""Tests of the Python client example against the demo set-up: the daemon's
sandbox Douyin (`douyin-tokend sandbox`) and `douyin-tokend serve`, both on
127.0.0.1, started afresh for each test and stopped after it whatever
happened (and killed by the kernel if this process dies first).

Run from the repository root, after `cargo build` (or `cargo test`):

    target/python-example/bin/python -m unittest discover -s examples/python -v

The binary is $DOUYIN_TOKEND_BINARY, else ${CARGO_TARGET_DIR:-target}/debug/douyin-tokend.
"""

import ctypes
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import douyin_tokend_client as example  # noqa: E402  (the module under test)

CARGO_TARGET_DIRECTORY = pathlib.Path(
    os.environ.get("CARGO_TARGET_DIR") or example.REPOSITORY_ROOT / "target"
)
BINARY = pathlib.Path(
    os.environ.get("DOUYIN_TOKEND_BINARY") or CARGO_TARGET_DIRECTORY / "debug" / "douyin-tokend"
)
# Upper bound for anything the tests wait for (a debug build starting, an
# exit, an audit line): generous, since CI's two cores also run other work.
PATIENCE_SECONDS = 30.0
ACCOUNT_ID = "7000000000000000001"
CLIENT_KEY = "awpythonexample1"
# A stand-in: the sandbox and the daemon share it, nothing real.
APP_SECRET = "python-example-stand-in-secret"
APP_SECRET_VARIABLE = "PYTHON_EXAMPLE_APP_SECRET"
# The documented example order, which the sandbox knows from the start.
DOCUMENTED_ORDER_ID = "keXkM0H5DR"
# Short enough that waiting for a token to expire keeps the test short, long
# enough that a fetched token outlives the daemon's 5 s hand-out margin.
SHORT_TOKEN_LIFETIME_SECONDS = 8
# Variables of the test's own environment that would steer the daemon away
# from the config file the test writes.
STEERING_VARIABLES = (
    "DOUYIN_TOKEND_LISTEN",
    "DOUYIN_TOKEND_DATABASE",
    "DOUYIN_TOKEND_DOUYIN_BASE_URL",
    "DOUYIN_TOKEND_ADDRESS",
    "DOUYIN_TOKEND_API_KEY",
    "DOUYIN_TOKEND_API_KEY_FILE",
    "CREDENTIALS_DIRECTORY",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "MAINPID",
)

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_the_test_process():
    """Runs in each child before exec: the kernel kills the child when the
    test process dies, even by SIGKILL or a CI timeout, so nothing outlives it."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _clean_environment(**extra):
    environment = {
        name: value for name, value in os.environ.items() if name not in STEERING_VARIABLES
    }
    environment.update(extra)
    return environment


class DemoSetUp:
    """The sandbox Douyin and a daemon on it, in a temporary directory; every
    step registers its own undoing with the test, so a failure half-way still
    stops what was started."""

    def __init__(self, test: unittest.TestCase, token_lifetime: str):
        self._test = test
        directory = tempfile.TemporaryDirectory(prefix="douyin-tokend-python-example-")
        test.addCleanup(directory.cleanup)
        self.directory = pathlib.Path(directory.name)
        self.sandbox_url = self._start_sandbox(token_lifetime)
        self.api_key, example_key_sha256 = self._new_key()
        self.operator_key, operator_key_sha256 = self._new_key()
        config_path = self._write_config(example_key_sha256, operator_key_sha256)
        self.daemon_address = self._start_daemon(config_path)

    def _spawn(self, arguments, log_name, environment):
        log_path = self.directory / log_name
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(BINARY), *arguments],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                preexec_fn=_die_with_the_test_process,
            )
        self._test.addCleanup(self._stop, process, log_path)
        return process, log_path

    def _stop(self, process, log_path):
        """SIGTERM, then SIGKILL if it has not exited within the patience.
        The process's log goes to stderr when the test failed (so CI shows
        it) or PYTHON_EXAMPLE_SHOW_LOGS is set."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=PATIENCE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=PATIENCE_SECONDS)
        if self._test_failed() or os.environ.get("PYTHON_EXAMPLE_SHOW_LOGS"):
            sys.stderr.write(f"\n--- {log_path.name}\n{log_path.read_text(errors='replace')}")

    def _test_failed(self):
        """Whether the test failed so far. Cleanups get no public word of it:
        this reads the result unittest keeps in the test's private _outcome,
        and says False when there is none."""
        result = getattr(getattr(self._test, "_outcome", None), "result", None)
        recorded = [*getattr(result, "failures", ()), *getattr(result, "errors", ())]
        return any(test is self._test for test, _ in recorded)

    def _fail(self, message, log_path):
        self._test.fail(f"{message}\n--- {log_path.name}\n{log_path.read_text(errors='replace')}")

    def _start_sandbox(self, token_lifetime):
        process, log_path = self._spawn(
            [
                "--log-format", "json", "sandbox",
                "--listen", "127.0.0.1:0",
                "--app", f"{CLIENT_KEY}:{APP_SECRET}",
                "--merchant", f"{ACCOUNT_ID}:{CLIENT_KEY}",
                "--token-lifetime", token_lifetime,
            ],
            "sandbox.log",
            _clean_environment(),
        )
        deadline = time.monotonic() + PATIENCE_SECONDS
        while time.monotonic() < deadline:
            for line in log_path.read_text(errors="replace").splitlines():
                if '"sandbox Douyin listening"' in line:
                    return json.loads(line)["fields"]["url"]
            if process.poll() is not None:
                self._fail(f"the sandbox exited with {process.returncode}", log_path)
            time.sleep(0.05)
        self._fail(f"the sandbox did not listen within {PATIENCE_SECONDS} s", log_path)

    def _new_key(self):
        """An API key and the key_sha256 line for [[clients]], from the admin
        CLI's `client new-key`, as an operator makes one."""
        made = subprocess.run(
            [str(BINARY), "client", "new-key"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            env=_clean_environment(), timeout=PATIENCE_SECONDS, check=True,
        )
        key_sha256 = re.search(r'key_sha256 = "([0-9a-f]{64})"', made.stderr).group(1)
        return made.stdout.strip(), key_sha256

    def _write_config(self, example_key_sha256, operator_key_sha256):
        config_path = self.directory / "config.toml"
        config_path.write_text(
            f"""# The Python example's daemon: loopback only, a throwaway database.
listen = "127.0.0.1:0"
database = "{self.directory / 'tokend.db'}"
shutdown_grace = "2s"

[douyin]
base_url = "{self.sandbox_url}"

[refresh]
# No scheduled refreshes: the only token fetches are those the test causes,
# so which token the sandbox rejects, and with which code, is certain.
sweep = "off"

[[apps]]
client_key = "{CLIENT_KEY}"
client_secret_env = "{APP_SECRET_VARIABLE}"

[[merchants]]
account_id = "{ACCOUNT_ID}"
client_key = "{CLIENT_KEY}"

# The client team's service: the example's scopes, bound to its merchant.
[[clients]]
name = "python-example"
key_sha256 = "{example_key_sha256}"
scopes = ["aftersale.read", "token.read", "token.report"]
merchants = ["{ACCOUNT_ID}"]

# The test's operator, reading the audit trail with the admin CLI.
[[clients]]
name = "test-operator"
key_sha256 = "{operator_key_sha256}"
scopes = ["admin"]
"""
        )
        return config_path

    def _start_daemon(self, config_path):
        """Starts `serve` with a NOTIFY_SOCKET of the test's own and waits for
        READY=1, whose STATUS names the port the daemon bound: no free-port
        race, no polling of the port."""
        notify_path = self.directory / "notify"
        notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._test.addCleanup(notify_socket.close)
        notify_socket.bind(str(notify_path))
        notify_socket.settimeout(0.25)
        process, log_path = self._spawn(
            ["--config", str(config_path), "serve"],
            "daemon.log",
            _clean_environment(
                NOTIFY_SOCKET=str(notify_path), **{APP_SECRET_VARIABLE: APP_SECRET}
            ),
        )
        deadline = time.monotonic() + PATIENCE_SECONDS
        while time.monotonic() < deadline:
            try:
                message = notify_socket.recv(4096).decode()
            except socket.timeout:
                if process.poll() is not None:
                    self._fail(f"the daemon exited with {process.returncode}", log_path)
                continue
            if "READY=1" in message.splitlines():
                address = re.search(r"serving gRPC on (127\.0\.0\.1:\d+)", message)
                if address is None:
                    self._fail(f"READY=1 without an address: {message!r}", log_path)
                return address.group(1)
        self._fail(f"the daemon sent no READY=1 within {PATIENCE_SECONDS} s", log_path)

    def audit_entries(self, action):
        """The daemon's audit lines of one action, through the admin CLI."""
        listed = subprocess.run(
            [str(BINARY), "audit", "--daemon", self.daemon_address, "list", "--json"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            env=_clean_environment(DOUYIN_TOKEND_API_KEY=self.operator_key),
            timeout=PATIENCE_SECONDS, check=True,
        )
        return [entry for entry in json.loads(listed.stdout) if entry["action"] == action]


class PythonClientExampleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not BINARY.is_file():
            raise FileNotFoundError(
                f"{BINARY} does not exist: run `cargo build` first, or set DOUYIN_TOKEND_BINARY"
            )
        import grpc  # grpcio

        # Everything here is on 127.0.0.1: never through a proxy the
        # environment may name (grpc and urllib both honour no_proxy).
        for name in ("no_proxy", "NO_PROXY"):
            os.environ[name] = ",".join(filter(None, (os.environ.get(name), "127.0.0.1")))

        cls.grpc = grpc
        stubs_directory = tempfile.TemporaryDirectory(prefix="douyin-tokend-stubs-")
        cls.addClassCleanup(stubs_directory.cleanup)
        cls.stubs = example.generate_stubs(pathlib.Path(stubs_directory.name))

    def start_demo_set_up(self, token_lifetime="2h"):
        demo = DemoSetUp(self, token_lifetime)
        channel = self.grpc.insecure_channel(demo.daemon_address)
        self.addCleanup(channel.close)
        return demo, example.TokendClient(channel, demo.api_key, self.stubs)

    def send_lookup_to_sandbox(self, demo):
        return lambda access_token: example.get_after_sale_order_detail_from_douyin(
            demo.sandbox_url, access_token, ACCOUNT_ID, DOCUMENTED_ORDER_ID
        )

    def test_after_sale_order_detail_lookup_through_the_daemon(self):
        demo, tokend = self.start_demo_set_up()

        detail = tokend.get_after_sale_order_detail(ACCOUNT_ID, DOCUMENTED_ORDER_ID)

        self.assertEqual(detail.extra.error_code, 0)
        self.assertEqual(detail.data.error_code, 0)
        self.assertEqual(
            [order.order_id for order in detail.data.after_sale_order_list],
            [DOCUMENTED_ORDER_ID],
        )
        self.assertEqual(detail.data.after_sale_order_list[0].after_sale_id, "LVuoIFGELu")

    def test_a_token_douyin_answers_2190008_for_is_reported_and_replaced(self):
        demo, tokend = self.start_demo_set_up(f"{SHORT_TOKEN_LIFETIME_SECONDS}s")
        sent_with = []
        send_lookup = self.send_lookup_to_sandbox(demo)

        def send_first_after_the_token_expired(access_token):
            # The first call reaches Douyin only after its token expired (it
            # sat in a queue, say): Douyin answers 2190008.
            if not sent_with:
                time.sleep(SHORT_TOKEN_LIFETIME_SECONDS + 1)
            sent_with.append(access_token)
            return send_lookup(access_token)

        outcome = example.call_douyin_with_daemon_token(
            tokend, ACCOUNT_ID, send_first_after_the_token_expired
        )

        self.assertEqual(outcome.rejected_code, 2190008)
        self.assertEqual(example.douyin_error_code(outcome.answer), 0, outcome.answer)
        self.assertEqual(sent_with, [outcome.reported_token, outcome.access_token])
        self.assertNotEqual(outcome.access_token, outcome.reported_token)
        # The daemon heard the report: it is on its audit trail, naming the
        # rejected token (a client that only asked GetAccessToken again would
        # also get a fresh token here, since the daemon knows expiry).
        reported = self.wait_for_audit_entries(demo, "invalid_report")
        self.assertEqual(
            [entry["token_fingerprint"] for entry in reported],
            [example.token_fingerprint(outcome.reported_token)],
        )

    def test_a_token_killed_behind_the_daemons_back_works_again_only_after_the_report(self):
        demo, tokend = self.start_demo_set_up()
        handed_out = tokend.get_access_token(ACCOUNT_ID)
        # Two fetches at Douyin's token endpoint by someone else: Douyin keeps
        # the newest two tokens, so the daemon's is dead and the daemon cannot
        # know; asking GetAccessToken again would get the same dead token.
        for _ in range(2):
            fetch_token_behind_the_daemons_back(demo.sandbox_url)

        outcome = example.call_douyin_with_daemon_token(
            tokend, ACCOUNT_ID, self.send_lookup_to_sandbox(demo)
        )

        self.assertEqual(outcome.reported_token, handed_out.access_token)
        self.assertEqual(outcome.rejected_code, 2190002)
        self.assertEqual(example.douyin_error_code(outcome.answer), 0, outcome.answer)
        self.assertEqual(outcome.generation, handed_out.generation + 1)

    def test_the_command_line_prints_both_answers_and_no_token(self):
        demo, tokend = self.start_demo_set_up()

        ran = subprocess.run(
            [
                sys.executable, str(pathlib.Path(example.__file__)),
                "--daemon", demo.daemon_address,
                "--douyin-base-url", demo.sandbox_url,
                "--account-id", ACCOUNT_ID,
                "--order-id", DOCUMENTED_ORDER_ID,
            ],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
            env=_clean_environment(DOUYIN_TOKEND_API_KEY=demo.api_key),
            timeout=PATIENCE_SECONDS,
        )

        self.assertEqual(ran.returncode, 0, ran.stderr)
        *detail_lines, outcome_line = ran.stdout.strip().splitlines()
        detail = json.loads("\n".join(detail_lines))
        self.assertEqual(
            detail["data"]["after_sale_order_list"][0]["order_id"], DOCUMENTED_ORDER_ID
        )
        outcome = json.loads(outcome_line)
        self.assertEqual(outcome["douyin_error_code"], 0, outcome)
        current_token = tokend.get_access_token(ACCOUNT_ID).access_token
        self.assertEqual(outcome["token"], f"token:{example.token_fingerprint(current_token)}")
        self.assertNotIn(current_token, ran.stdout + ran.stderr)

    def wait_for_audit_entries(self, demo, action):
        """Audit lines are written in the background: waits, within the patience."""
        deadline = time.monotonic() + PATIENCE_SECONDS
        while True:
            entries = demo.audit_entries(action)
            if entries or time.monotonic() >= deadline:
                return entries
            time.sleep(0.1)


def fetch_token_behind_the_daemons_back(sandbox_url):
    """What a service must never do: fetch a token from Douyin itself."""
    request = urllib.request.Request(
        f"{sandbox_url}/oauth/client_token/",
        data=json.dumps(
            {"client_key": CLIENT_KEY, "client_secret": APP_SECRET, "grant_type": "client_credential"}
        ).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=PATIENCE_SECONDS) as response:
        answer = json.load(response)
    assert answer["data"]["error_code"] == 0, answer


if __name__ == "__main__":
    unittest.main()
