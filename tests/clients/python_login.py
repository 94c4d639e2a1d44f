"""A web backend's side of a login, written as a Python grpcio client would.

Usage: python_login.py GEN_DIR ADDRESS API_KEY
GEN_DIR holds stubs generated from proto/ by grpc_tools.protoc. Prints one
JSON line with what it saw; exits non-zero on any surprise.
"""

import json
import sys
import urllib.error
import urllib.parse
import urllib.request

gen_dir, address, api_key = sys.argv[1:4]
sys.path.insert(0, gen_dir)

import grpc  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from authbroker.v1 import login_pb2, login_pb2_grpc  # noqa: E402


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def follow_sandbox(authorize_url, user):
    """The browser step: returns the query of the redirect to the callback."""
    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(authorize_url + "&sandbox_user=" + user)
    except urllib.error.HTTPError as e:
        assert e.code == 302, e.code
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(e.headers["Location"]).query))
    raise AssertionError("the sandbox did not redirect")


def error_reason(err):
    status = rpc_status.from_call(err)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, info.domain
    raise AssertionError("no ErrorInfo in the status details")


def main():
    metadata = [("authorization", "Bearer " + api_key)]
    with grpc.insecure_channel(address) as channel:
        stub = login_pb2_grpc.LoginServiceStub(channel)
        begun = stub.BeginLogin(
            login_pb2.BeginLoginRequest(provider="sandbox", return_to="/after"),
            metadata=metadata,
        )
        callback = follow_sandbox(begun.authorize_url, "pythonista")
        assert callback["state"] == begun.state
        done = stub.CompleteLogin(
            login_pb2.CompleteLoginRequest(state=callback["state"], code=callback["code"]),
            metadata=metadata,
        )
        try:
            stub.CompleteLogin(
                login_pb2.CompleteLoginRequest(state=callback["state"], code=callback["code"]),
                metadata=metadata,
            )
            raise AssertionError("a replayed state was accepted")
        except grpc.RpcError as err:
            replay_code = err.code().name
            replay_reason, domain = error_reason(err)
        try:
            stub.BeginLogin(login_pb2.BeginLoginRequest(provider="sandbox"))
            raise AssertionError("a call without an API key was accepted")
        except grpc.RpcError as err:
            unauth_code = err.code().name
            unauth_reason, _ = error_reason(err)
    print(
        json.dumps(
            {
                "outcome": login_pb2.Outcome.Name(done.outcome),
                "user_id": done.binding.user_id,
                "username": done.identity.username,
                "return_to": done.return_to,
                "replay": [replay_code, replay_reason, domain],
                "unauthenticated": [unauth_code, unauth_reason],
            }
        )
    )


if __name__ == "__main__":
    main()
