"""Example Python client of douyin-tokend, for client teams to copy from.

Two things a service in a merchant's stack does with the daemon:

(a) Look an after-sale order up through the daemon
    (AfterSaleService.GetAfterSaleOrderDetail): the daemon holds the tokens,
    the caller names the merchant and never sees a token.
(b) Call Douyin itself with the daemon's token, for the APIs the daemon does
    not serve: ask TokenService.GetAccessToken for the token, never Douyin's
    token endpoint (a fetch there kills the token every other service holds),
    and when Douyin rejects the token (2190002, 2190008, 28001003, 28001008),
    report it with TokenService.ReportInvalidToken, whose answer is the token
    to use now, and send the call once more with it.

The gRPC stubs are generated from the repository's proto/ when this runs
(grpcio-tools), never committed, so they cannot drift from the contract.

Run against a daemon (the API key, with scopes aftersale.read, token.read and
token.report, comes from the environment, never the command line):

    DOUYIN_TOKEND_API_KEY=dtk_... python3 examples/python/douyin_tokend_client.py \\
        --daemon 127.0.0.1:50051 --douyin-base-url https://open.douyin.com \\
        --account-id 7000000000000000001 --order-id keXkM0H5DR

It prints the lookup's answer as JSON, then how the direct Douyin call went;
tokens are printed only as fingerprints.
"""

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import pathlib
import sys
import tempfile
import urllib.parse
import urllib.request
from typing import Callable, Optional

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_DIRECTORY = REPOSITORY_ROOT / "proto"

# Douyin's answers that mean "this token is not accepted": the goodlife APIs'
# 2190002 (invalid) and 2190008 (expired), and the open-API gateway's
# 28001003 and 28001008. The daemon treats the same four codes so.
TOKEN_REJECTED_CODES = frozenset({2190002, 2190008, 28001003, 28001008})

# The after-sale order detail API (售后单详情查询), the one goodlife API the
# direct-call example uses; any goodlife GET takes the token the same way.
AFTER_SALE_ORDER_DETAIL_PATH = "/goodlife/v1/akte/after_sale/order_detail/get/"

# Every call gets a deadline: the daemon answers within it or says why not.
DEFAULT_TIMEOUT_SECONDS = 10.0


@dataclasses.dataclass
class GeneratedStubs:
    """The modules grpcio-tools generated from proto/."""

    after_sale_messages: object
    after_sale_services: object
    token_messages: object
    token_services: object


def generate_stubs(output_directory: pathlib.Path) -> GeneratedStubs:
    """Generates Python stubs for every .proto file under proto/ into
    output_directory, puts it on sys.path and imports the ones this example
    uses. Generating all of them also proves the whole contract compiles."""
    from grpc_tools import protoc  # grpcio-tools
    import importlib.resources

    well_known_types = importlib.resources.files("grpc_tools") / "_proto"
    proto_files = sorted(
        str(path.relative_to(PROTO_DIRECTORY))
        for path in PROTO_DIRECTORY.rglob("*.proto")
    )
    output_directory.mkdir(parents=True, exist_ok=True)
    exit_code = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIRECTORY}",
            f"--proto_path={well_known_types}",
            f"--python_out={output_directory}",
            f"--grpc_python_out={output_directory}",
            *proto_files,
        ]
    )
    if exit_code != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with exit code {exit_code}")
    if str(output_directory) not in sys.path:
        sys.path.insert(0, str(output_directory))
    importlib.invalidate_caches()
    return GeneratedStubs(
        after_sale_messages=importlib.import_module("douyin.goodlife.v1.after_sale_pb2"),
        after_sale_services=importlib.import_module("douyin.goodlife.v1.after_sale_pb2_grpc"),
        token_messages=importlib.import_module("tokend.v1.token_pb2"),
        token_services=importlib.import_module("tokend.v1.token_pb2_grpc"),
    )


def token_fingerprint(access_token: str) -> str:
    """How the daemon names a token in its audit trail and logs (the first 4
    bytes of its SHA-256, in hex): print this, never the token."""
    return hashlib.sha256(access_token.encode()).hexdigest()[:8]


class TokendClient:
    """The daemon's AfterSaleService and TokenService, with the API key sent
    as "authorization: Bearer <key>" on every call."""

    def __init__(self, channel, api_key: str, stubs: GeneratedStubs,
                 timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS):
        self._stubs = stubs
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout_seconds = timeout_seconds
        self._after_sale = stubs.after_sale_services.AfterSaleServiceStub(channel)
        self._tokens = stubs.token_services.TokenServiceStub(channel)

    def get_after_sale_order_detail(self, account_id: str, order_id: str):
        """(a) The lookup through the daemon: Douyin's answer, its `extra`
        and `data` mirrored field for field."""
        request = self._stubs.after_sale_messages.GetAfterSaleOrderDetailRequest(
            account_id=account_id, order_id=order_id
        )
        return self._after_sale.GetAfterSaleOrderDetail(
            request, metadata=self._metadata, timeout=self._timeout_seconds
        )

    def get_access_token(self, account_id: str):
        """The merchant's app's current token (never an expired one)."""
        request = self._stubs.token_messages.GetAccessTokenRequest(account_id=account_id)
        return self._tokens.GetAccessToken(
            request, metadata=self._metadata, timeout=self._timeout_seconds
        )

    def report_invalid_token(self, account_id: str, access_token: str):
        """Tells the daemon Douyin rejected access_token; the answer is the
        token to use now (a fresh one when the reported one was current)."""
        request = self._stubs.token_messages.ReportInvalidTokenRequest(
            account_id=account_id, access_token=access_token
        )
        return self._tokens.ReportInvalidToken(
            request, metadata=self._metadata, timeout=self._timeout_seconds
        )


def douyin_error_code(answer: dict) -> int:
    """Douyin's error code in an answer, 0 for success: goodlife APIs put it
    in extra.error_code and data.error_code, the newer gateway in err_no."""
    for code in (
        (answer.get("extra") or {}).get("error_code"),
        (answer.get("data") or {}).get("error_code"),
        answer.get("err_no"),
    ):
        if code:
            return int(code)
    return 0


def get_after_sale_order_detail_from_douyin(
    douyin_base_url: str, access_token: str, account_id: str, order_id: str,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
) -> dict:
    """One direct call to Douyin's after-sale detail API with access_token in
    the access-token header, as a service calling Douyin itself does."""
    query = urllib.parse.urlencode({"account_id": account_id, "order_id": order_id})
    request = urllib.request.Request(
        f"{douyin_base_url.rstrip('/')}{AFTER_SALE_ORDER_DETAIL_PATH}?{query}",
        headers={"access-token": access_token, "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout_seconds) as response:
        return json.load(response)


@dataclasses.dataclass
class DouyinCallOutcome:
    """How a direct Douyin call went: the answer Douyin gave last, the token
    it was sent with, and, when Douyin rejected the first token, its code
    and the token that was reported."""

    answer: dict
    access_token: str
    generation: int
    rejected_code: Optional[int] = None
    reported_token: Optional[str] = None


def call_douyin_with_daemon_token(
    tokend: TokendClient, account_id: str, send_to_douyin: Callable[[str], dict]
) -> DouyinCallOutcome:
    """(b) The pattern for calling Douyin with the daemon's token:
    GetAccessToken, send; when Douyin rejects the token, ReportInvalidToken
    with exactly that token and send once more with the token it answers.
    Once only: a fresh token rejected again is a real failure to surface, not
    a reason to loop (each report may cost a token fetch)."""
    token = tokend.get_access_token(account_id)
    answer = send_to_douyin(token.access_token)
    code = douyin_error_code(answer)
    if code not in TOKEN_REJECTED_CODES:
        return DouyinCallOutcome(answer, token.access_token, token.generation)
    fresh = tokend.report_invalid_token(account_id, token.access_token)
    answer = send_to_douyin(fresh.access_token)
    return DouyinCallOutcome(
        answer, fresh.access_token, fresh.generation,
        rejected_code=code, reported_token=token.access_token,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--daemon", default="127.0.0.1:50051", help="the daemon's gRPC address (plaintext)")
    parser.add_argument("--douyin-base-url", default="https://open.douyin.com")
    parser.add_argument("--account-id", required=True, help="a merchant registered in the daemon")
    parser.add_argument("--order-id", required=True)
    arguments = parser.parse_args()
    api_key = os.environ.get("DOUYIN_TOKEND_API_KEY")
    if not api_key:
        parser.error("set DOUYIN_TOKEND_API_KEY to the client's API key")

    import grpc  # grpcio
    from google.protobuf import json_format  # protobuf, installed with grpcio-tools

    with tempfile.TemporaryDirectory(prefix="douyin-tokend-stubs-") as stubs_directory:
        stubs = generate_stubs(pathlib.Path(stubs_directory))
        with grpc.insecure_channel(arguments.daemon) as channel:
            tokend = TokendClient(channel, api_key, stubs)
            detail = tokend.get_after_sale_order_detail(arguments.account_id, arguments.order_id)
            print(json_format.MessageToJson(detail, preserving_proto_field_name=True))
            outcome = call_douyin_with_daemon_token(
                tokend, arguments.account_id,
                lambda access_token: get_after_sale_order_detail_from_douyin(
                    arguments.douyin_base_url, access_token,
                    arguments.account_id, arguments.order_id,
                ),
            )
    print(json.dumps({
        "douyin_error_code": douyin_error_code(outcome.answer),
        "token": f"token:{token_fingerprint(outcome.access_token)}",
        "generation": outcome.generation,
        "rejected_code": outcome.rejected_code,
        "reported_token": (f"token:{token_fingerprint(outcome.reported_token)}"
                           if outcome.reported_token else None),
    }))
    return 0 if douyin_error_code(outcome.answer) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
