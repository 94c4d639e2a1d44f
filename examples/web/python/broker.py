"""authbroker as this app uses it: BeginLogin, CompleteLogin and LinkIdentity
with their ErrorInfo reasons, retried where the README's error table says
the same call may be retried, and AdminService.ListProviders.

The stubs are generated from the repository's proto/ at start, into a
temporary directory, so no generated code is committed and it cannot drift
from the protos.
"""

import importlib.resources
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_tools import protoc

log = logging.getLogger(__name__)

PROTO_DIR = Path(os.environ.get("AUTHBROKER_PROTO_DIR", Path(__file__).resolve().parents[3] / "proto"))

# Reasons after which the README says to retry CompleteLogin or LinkIdentity
# with the same state and code (ticket and user id). Every other reason is final.
RETRY_SAME_CALL = {
    "LOGIN_IN_PROGRESS",
    "PROVIDER_UNAVAILABLE",
    "STORE_UNAVAILABLE",
    "STATE_STORE_UNAVAILABLE",
    "TOO_MANY_PENDING_LOGINS",
    "SERVER_OVERLOADED",
    "BROKER_UNREACHABLE",
}
BACKOFF_SECONDS = (0.2, 0.5, 1.0)
CALL_TIMEOUT_SECONDS = 30


def _load_stubs():
    out = tempfile.mkdtemp(prefix="authbroker-stubs-")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    for name in ("login", "admin"):
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_DIR / "authbroker" / "v1" / f"{name}.proto"),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"cannot generate stubs from {PROTO_DIR}")
    sys.path.insert(0, out)
    from authbroker.v1 import admin_pb2, admin_pb2_grpc, login_pb2, login_pb2_grpc

    return admin_pb2, admin_pb2_grpc, login_pb2, login_pb2_grpc


admin_pb2, admin_pb2_grpc, login_pb2, login_pb2_grpc = _load_stubs()
OUTCOME_LINK_REQUIRED = login_pb2.OUTCOME_LINK_REQUIRED
OUTCOME_USER_CREATED = login_pb2.OUTCOME_USER_CREATED


class BrokerError(Exception):
    """A failed call, by its ErrorInfo reason (BROKER_UNREACHABLE when
    authbroker could not be reached at all)."""

    def __init__(self, reason, code):
        super().__init__(reason)
        self.reason = reason
        self.code = code


def _broker_error(err):
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return BrokerError(info.reason, err.code().name)
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return BrokerError("BROKER_UNREACHABLE", err.code().name)
    return BrokerError("INTERNAL", err.code().name)


class Broker:
    def __init__(self, address, api_key):
        self._channel = grpc.insecure_channel(address)
        self._login = login_pb2_grpc.LoginServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        # The API key goes in every call's metadata and nowhere else: never
        # in a page, a log line or an error message.
        self._metadata = [("authorization", f"Bearer {api_key}")] if api_key else []

    def _call(self, method, request):
        try:
            return method(request, metadata=self._metadata, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as err:
            raise _broker_error(err) from None

    def _call_with_retries(self, method, request):
        for delay in (*BACKOFF_SECONDS, None):
            try:
                return self._call(method, request)
            except BrokerError as e:
                if e.reason not in RETRY_SAME_CALL or delay is None:
                    raise
                log.warning("authbroker answered %s; retrying the same call in %ss", e.reason, delay)
                time.sleep(delay)

    def providers(self):
        """(name, display name) of each enabled provider. ListProviders needs
        an admin key; `authbroker dev` has no keys, so every caller may."""
        answer = self._call(self._admin.ListProviders, admin_pb2.ListProvidersRequest())
        return [(p.name, p.display_name or p.name) for p in answer.providers if p.enabled]

    def begin(self, provider, redirect_uri, return_to):
        request = login_pb2.BeginLoginRequest(provider=provider, redirect_uri=redirect_uri, return_to=return_to)
        return self._call(self._login.BeginLogin, request)

    def complete(self, state, code, error, error_description):
        request = login_pb2.CompleteLoginRequest(
            state=state, code=code, error=error, error_description=error_description
        )
        return self._call_with_retries(self._login.CompleteLogin, request)

    def link(self, ticket, user_id):
        request = login_pb2.LinkIdentityRequest(link_ticket=ticket, user_id=user_id)
        return self._call_with_retries(self._login.LinkIdentity, request)
